"""A convscope cluster on this machine, for the scale-out tests and benchmarks: a real
``redis-server`` on a free loopback port (no persistence), ``convscope worker`` processes and
gunicorn web processes in broker mode, all sharing one data directory.

    with Cluster(root) as cluster:
        cluster.start_redis()
        cluster.start_worker()
        web = cluster.start_web()
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.load import (MALLOC_SETTINGS, GunicornServer, free_port,  # noqa: E402
                             terminate)


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


@dataclass
class Process:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as the OOM killer or a lost machine."""
        if self.alive:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 30.0) -> None:
        terminate(self.popen, timeout)

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if not self.alive:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: no {text!r} after {timeout} s:\n{self.log()[-3000:]}")


@dataclass
class Cluster:
    """Redis, workers and web processes under ``root`` (data directory and logs)."""

    root: Path
    checkpoint_dir: Path | None = None          # None: the bundled demo
    env: dict[str, str] = field(default_factory=dict)   # for every worker and web process
    redis_port: int = field(default_factory=free_port)
    redis: Process | None = None
    workers: list[Process] = field(default_factory=list)
    webs: list[GunicornServer] = field(default_factory=list)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def common_env(self) -> dict[str, str]:
        env = {**MALLOC_SETTINGS, **os.environ, "CONVSCOPE_BROKER_URL": self.broker_url,
               "CONVSCOPE_DATA_DIR": str(self.data_dir), "CONVSCOPE_DEVICE": "cpu",
               "CONVSCOPE_TORCH_THREADS": os.environ.get("CONVSCOPE_TORCH_THREADS", "1"),
               **self.env}
        if self.checkpoint_dir is not None:
            env["CONVSCOPE_CHECKPOINT_DIR"] = str(self.checkpoint_dir)
        return env

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Process:
        log_path = self.root / f"{name}.log"
        log_file = open(log_path, "ab")
        self._stack.callback(log_file.close)
        popen = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file,
                                 stderr=subprocess.STDOUT)
        return Process(name, popen, log_path)

    # --- Redis -----------------------------------------------------------------------------

    def start_redis(self, timeout: float = 20.0) -> Process:
        """redis-server on ``redis_port`` (the same port again after a stop), nothing saved."""
        import redis

        server = redis_server_path()
        if server is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.redis = self._spawn(
            f"redis-{self.redis_port}",
            [server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)], dict(os.environ))
        client = redis.Redis(port=self.redis_port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return self.redis
            if not self.redis.alive:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{self.redis.log()[-2000:]}")

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.stop(10)

    # --- workers and web processes ---------------------------------------------------------

    def start_worker(self, *, env: dict[str, str] | None = None, wait: bool = True,
                     timeout: float = 120.0) -> Process:
        name = f"worker-{len(self.workers) + 1}"
        process = self._spawn(name, [sys.executable, "-m", "app.cli", "worker", "--device",
                                     "cpu", "--loglevel", "INFO"],
                              {**self.common_env(), **(env or {})})
        self.workers.append(process)
        if wait:
            process.wait_for_log("ready.", timeout)     # Celery: "celery@... ready."
        return process

    def start_workers(self, count: int, timeout: float = 180.0) -> list[Process]:
        """``count`` workers started together (each loads the model), once all are ready."""
        started = [self.start_worker(wait=False) for _ in range(count)]
        for worker in started:
            worker.wait_for_log("ready.", timeout)
        return started

    def start_web(self, *, env: dict[str, str] | None = None,
                  timeout: float = 120.0) -> GunicornServer:
        """A gunicorn web process in broker mode (ready once a worker has published the
        checkpoint listing)."""
        from benchmarks.load import gunicorn_server

        server = self._stack.enter_context(gunicorn_server(
            {**self.common_env(), "CONVSCOPE_WORKERS": "1", **(env or {})},
            data_dir=self.data_dir, ready_timeout=timeout))
        self.webs.append(server)
        return server

    def worker_running(self, job_id: str) -> Process | None:
        """The worker process whose pid the job's record names while it runs."""
        import json

        try:
            record = json.loads((self.data_dir / "jobs" / f"{job_id}.json").read_text())
        except (OSError, ValueError):
            return None
        pid = (record.get("worker") or {}).get("pid") if record.get("status") == "running" \
            else None
        return next((w for w in self.workers if w.pid == pid and w.alive), None)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(20)
        self._stack.close()         # web processes, then log files
        self.stop_redis()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def job_api(base_url: str, job_id: str, **kwargs: Any) -> dict[str, Any]:
    response = requests.get(f"{base_url}/api/v1/jobs/{job_id}", timeout=10, **kwargs)
    response.raise_for_status()
    return response.json()


def wait_for_status(base_url: str, job_id: str, statuses: tuple[str, ...],
                    timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = job_api(base_url, job_id)
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id[:8]} still {job['status']} after {timeout} s")
        time.sleep(0.1)


def iter_logs(cluster: Cluster) -> Iterator[str]:
    """Every process's log, for a failing test's message."""
    for process in cluster.workers:
        yield f"--- {process.name} ---\n{process.log()[-3000:]}"
    for web in cluster.webs:
        yield f"--- web {web.base_url} ---\n{web.log()[-2000:]}"
