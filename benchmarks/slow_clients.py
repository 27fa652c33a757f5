"""Slow-client attack on a real gunicorn: does /api/v1/health still answer?

    .venv/bin/python benchmarks/slow_clients.py                 # the shipped gunicorn.conf.py
    .venv/bin/python benchmarks/slow_clients.py --compare       # also gunicorn's gthread worker

Opens ``--headers`` connections that send a request line and then one header line every
``--interval`` seconds (never finishing the headers), and ``--bodies`` connections that announce
a 1 MB body, send a few bytes of it and then one byte every ``--interval`` seconds. While they
are open, /api/v1/health is asked once a second from fresh connections; the script prints the
slowest answer, how many probes failed, and how many attack connections the server had closed by
the end (a server with a read timeout closes them). Traffic goes only to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.load import gunicorn_server  # noqa: E402


@dataclass
class SlowClients:
    """Connections that never finish their request; ``closed_by_server`` counts the ones the
    server hung up on (a read returned EOF or the connection was reset)."""

    host: str
    port: int
    sockets: list[tuple[str, socket.socket]] = field(default_factory=list)
    closed_by_server: dict[str, int] = field(default_factory=lambda: {"headers": 0, "body": 0})
    responses: dict[str, list[bytes]] = field(default_factory=lambda: {"headers": [], "body": []})
    stop: threading.Event = field(default_factory=threading.Event)

    def open(self, kind: str, count: int) -> None:
        for number in range(count):
            connection = socket.create_connection((self.host, self.port), timeout=5)
            if kind == "headers":
                connection.sendall(f"GET /api/v1/health HTTP/1.1\r\nHost: {self.host}\r\n"
                                   f"X-Slow-{number}: 1\r\n".encode())
            else:
                connection.sendall(f"POST /api/v1/jobs HTTP/1.1\r\nHost: {self.host}\r\n"
                                   "Content-Type: application/json\r\n"
                                   "Content-Length: 1000000\r\n\r\n{\"model\": ".encode())
            connection.setblocking(False)
            self.sockets.append((kind, connection))

    def trickle(self, interval: float) -> None:
        """Send one more header line (or body byte) on each open connection every interval."""
        step = 0
        while not self.stop.wait(interval):
            step += 1
            for kind, connection in list(self.sockets):
                payload = f"X-More-{step}: 1\r\n".encode() if kind == "headers" else b" "
                try:
                    connection.send(payload)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._lost(kind, connection, b"")

    def reap(self) -> None:
        """Notice connections the server closed (EOF, or a response then EOF)."""
        for kind, connection in list(self.sockets):
            try:
                data = connection.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data and not data.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in data:
                continue
            self._lost(kind, connection, data)

    def _lost(self, kind: str, connection: socket.socket, data: bytes) -> None:
        with contextlib.suppress(ValueError):
            self.sockets.remove((kind, connection))
            self.closed_by_server[kind] += 1
            if data:
                self.responses[kind].append(data.split(b"\r\n", 1)[0])
        connection.close()

    def close(self) -> None:
        self.stop.set()
        for _, connection in self.sockets:
            connection.close()
        self.sockets.clear()


@contextlib.contextmanager
def slow_clients(host: str, port: int, *, headers: int, bodies: int,
                 interval: float = 1.0) -> Iterator[SlowClients]:
    clients = SlowClients(host, port)
    trickler = threading.Thread(target=clients.trickle, args=(interval,), daemon=True)
    try:
        clients.open("headers", headers)
        clients.open("body", bodies)
        trickler.start()
        yield clients
    finally:
        clients.close()
        if trickler.is_alive():
            trickler.join(interval + 1)


def health_seconds(host: str, port: int, timeout: float = 10.0) -> float | None:
    """Seconds for GET /api/v1/health on a fresh connection; None when it failed."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(f"GET /api/v1/health HTTP/1.1\r\nHost: {host}\r\n"
                               "Connection: close\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                data = connection.recv(4096)
                if not data:
                    break
                received += data
    except OSError:
        return None
    if not received.startswith(b"HTTP/1.1 200"):
        return None
    return time.monotonic() - started


def attack(host: str, port: int, *, headers: int, bodies: int, seconds: float,
           interval: float = 1.0) -> dict:
    """Hold the slow connections for ``seconds`` and probe health once a second."""
    timings: list[float] = []
    failures = 0
    with slow_clients(host, port, headers=headers, bodies=bodies, interval=interval) as clients:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            took = health_seconds(host, port)
            if took is None:
                failures += 1
            else:
                timings.append(took)
            clients.reap()
            time.sleep(max(0.0, 1.0 - (took or 0.0)))
        clients.reap()
        closed = dict(clients.closed_by_server)
        first_lines = {kind: sorted(set(lines)) for kind, lines in clients.responses.items()}
    return {"probes": len(timings) + failures, "failed": failures,
            "slowest_s": max(timings) if timings else None,
            "median_s": statistics.median(timings) if timings else None,
            "closed_by_server": closed, "first_lines": first_lines}


def run(label: str, extra_args: list[str], env: dict[str, str], args: argparse.Namespace) -> None:
    with gunicorn_server(env, extra_args=extra_args) as server:
        host, port = server.base_url.rsplit("/", 1)[1].split(":")
        result = attack(host, int(port), headers=args.headers, bodies=args.bodies,
                        seconds=args.seconds, interval=args.interval)
    slowest = "-" if result["slowest_s"] is None else f"{result['slowest_s'] * 1000:.0f} ms"
    median = "-" if result["median_s"] is None else f"{result['median_s'] * 1000:.1f} ms"
    print(f"{label:<34} health probes {result['probes']}, failed {result['failed']}, "
          f"median {median}, slowest {slowest}; slow connections closed by the server: "
          f"{result['closed_by_server']} {result['first_lines']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headers", type=int, default=50)
    parser.add_argument("--bodies", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--read-timeout", default="10",
                        help="CONVSCOPE_READ_TIMEOUT for the shipped config")
    parser.add_argument("--compare", action="store_true",
                        help="also run gunicorn's gthread worker (8 threads), the old setup")
    args = parser.parse_args(argv)
    env = {"CONVSCOPE_READ_TIMEOUT": args.read_timeout}
    run("shipped gunicorn.conf.py", [], env, args)
    if args.compare:
        run("gthread worker, 8 threads", ["--worker-class", "gthread", "--threads", "8",
                                          "app:create_app()"], env, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
