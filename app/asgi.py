"""Serve the Flask (WSGI) app from an asyncio server without letting slow clients hold threads.

gunicorn's threaded worker gives each connection a thread while it reads the request, so eight
clients that trickle their headers or go silent mid-body took the whole service offline. Here the
event loop does all the waiting on clients and a thread pool only runs application code:

- The request body is read on the loop, up to the app's ``MAX_CONTENT_LENGTH``, into memory (a
  temporary file past ``SPOOL_BYTES``). The app is called only once the whole body is here, so
  its threads never wait on a client. Each pause in the body is bounded by ``read_timeout``;
  a client that goes silent gets 408 and the connection is closed.
- A body over the limit (declared by Content-Length, or found while reading a chunked one) is
  not buffered: the app is called with the declared length and no body, which makes Flask
  answer its own 413 page (JSON or HTML), and the rest of the body is then read and discarded
  (bounded by bytes and time), so the client can read the 413 instead of meeting a reset.
- The response is pulled from the app's iterable a piece at a time in the pool and written on
  the loop, so a client that reads slowly holds a connection, never a thread; a client that
  reads nothing for ``read_timeout`` is dropped.
- Health and readiness probes run on a pool of their own, so they answer while every
  application thread is busy.

Header-read deadlines belong to the HTTP server, not to the app: see app/gunicorn_worker.py.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import unquote_to_bytes

log = logging.getLogger(__name__)

# Bodies up to this size stay in memory; larger ones go to a temporary file.
SPOOL_BYTES = 1024 * 1024
# The first pool call collects up to this much of a response; the rest is pulled piece by piece.
FIRST_RESPONSE_BYTES = 1024 * 1024
# File responses are read in pieces of this size (werkzeug's default is 8 KiB).
FILE_BLOCK_BYTES = 256 * 1024
# After ``read_timeout`` of grace, a body must arrive at least this fast on average (a 64 MiB
# upload may take half an hour; a trickle of a byte every few seconds is dropped).
MIN_BODY_BYTES_PER_S = 32 * 1024
PROBE_PATHS = frozenset({"/api/v1/health", "/api/v1/ready"})
_END = object()


class FileWrapper:
    """``wsgi.file_wrapper``: lets ``send_file`` responses be read in large blocks."""

    def __init__(self, file: Any, block_size: int = FILE_BLOCK_BYTES) -> None:
        self.file = file
        self.block_size = max(block_size, FILE_BLOCK_BYTES)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        data = self.file.read(self.block_size)
        if data:
            return data
        raise StopIteration

    def close(self) -> None:
        close = getattr(self.file, "close", None)
        if close is not None:
            close()


class _Response:
    """What one pool call produced: status, headers, the first body pieces and the rest."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.iterator: Iterator[bytes] | None = None
        self.iterable: Any = None

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and self.status is not None and self.chunks:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status = int(status.split(" ", 1)[0])
        self.headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                        for name, value in headers]
        return self.chunks.append          # the legacy write() callable

    def close(self) -> None:
        close = getattr(self.iterable, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 -- the response is finished either way
                log.exception("closing a response failed")


class WsgiBridge:
    """An ASGI application that serves ``wsgi_app``; gunicorn loads it as ``app:asgi_app()``.

    ``max_body`` is read from the app (``MAX_CONTENT_LENGTH``) unless given. ``flask_app`` is
    the wrapped app, for gunicorn hooks that need its services.
    """

    def __init__(self, wsgi_app: Any, *, threads: int = 8, read_timeout: float = 20.0,
                 max_body: int | None = None, drain_max_bytes: int = 256 * 1024 * 1024,
                 drain_seconds: float = 15.0, probe_threads: int = 2) -> None:
        self.flask_app = wsgi_app
        self.read_timeout = read_timeout
        if max_body is None:
            config = getattr(wsgi_app, "config", {})
            max_body = config.get("MAX_CONTENT_LENGTH") or 64 * 1024 * 1024
        self.max_body = int(max_body)
        self.drain_max_bytes, self.drain_seconds = drain_max_bytes, drain_seconds
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="http")
        self.probe_pool = concurrent.futures.ThreadPoolExecutor(
            probe_threads, thread_name_prefix="probe")

    # --- ASGI entry point ----------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Jobs are cancelled by gunicorn's worker_exit hook; only the pools end here.
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.probe_pool.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict, receive: Callable, send: Callable) -> None:
        declared = _content_length(scope)
        body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        try:
            if declared is not None and declared > self.max_body:
                length, over_limit = declared, True
            else:
                outcome = await self._read_body(receive, body)
                if outcome is None:
                    return                                   # the client went away
                if outcome == "timeout":
                    await _plain_error(send, 408, "E_REQUEST_TIMEOUT",
                                       "The request took too long to arrive.")
                    return
                length, over_limit = outcome
            body.seek(0)
            environ = _environ(scope, body, length)
            pool = self.probe_pool if environ["PATH_INFO"] in PROBE_PATHS else self.pool
            await self._respond(environ, pool, send)
            if over_limit:
                await self._discard_rest(receive)
        finally:
            body.close()

    # --- request body --------------------------------------------------------------------

    async def _read_body(self, receive: Callable, body: Any) -> tuple[int, bool] | str | None:
        """Buffer the body: (its length, whether it went over the limit), "timeout" when the
        client stalled, None when it disconnected.

        A client stalls when nothing arrives for ``read_timeout``, or when, after that much
        grace, it has sent less than ``MIN_BODY_BYTES_PER_S`` on average: a byte every few
        seconds must not hold a connection for ever."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        while True:
            # The time by which the bytes received so far must be followed by more.
            rate_deadline = started + self.read_timeout + received / MIN_BODY_BYTES_PER_S
            wait = min(self.read_timeout, rate_deadline - loop.time())
            if wait <= 0:
                return "timeout"
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                return "timeout"
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body:
                return received, True
            if chunk:
                body.write(chunk)
            if not message.get("more_body", False):
                return received, False

    async def _discard_rest(self, receive: Callable) -> None:
        """Read and drop what is left of a refused body, within bytes and time bounds; past
        them the server closes the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_seconds
        drained = 0
        while drained <= self.drain_max_bytes:
            remaining = min(deadline - loop.time(), self.read_timeout)
            if remaining <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    # --- response ------------------------------------------------------------------------

    async def _respond(self, environ: dict, pool: concurrent.futures.Executor,
                       send: Callable) -> None:
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(pool, self._start, environ)
        try:
            await self._send(send, {"type": "http.response.start", "status": response.status,
                                    "headers": response.headers})
            if response.chunks:
                await self._send(send, {"type": "http.response.body",
                                        "body": b"".join(response.chunks), "more_body": True})
            while response.iterator is not None:
                chunk = await loop.run_in_executor(pool, next, response.iterator, _END)
                if chunk is _END:
                    break
                if chunk:
                    await self._send(send, {"type": "http.response.body", "body": chunk,
                                            "more_body": True})
            await self._send(send, {"type": "http.response.body", "body": b""})
        except asyncio.TimeoutError:
            log.info("dropped a client that read nothing for %.0f s", self.read_timeout)
        finally:
            if response.iterable is not None:
                await loop.run_in_executor(pool, response.close)

    async def _send(self, send: Callable, message: dict) -> None:
        await asyncio.wait_for(send(message), self.read_timeout)

    def _start(self, environ: dict) -> _Response:
        """In a pool thread: call the app and collect the start of its response."""
        response = _Response()
        try:
            iterable = self.flask_app(environ, response.start_response)
        except Exception:  # noqa: BLE001 -- Flask handles its own errors; this is a last resort
            log.exception("the application failed before responding")
            return _internal_error()
        response.iterable = iterable
        try:
            iterator = iter(iterable)
            collected = sum(map(len, response.chunks))
            while collected < FIRST_RESPONSE_BYTES:
                chunk = next(iterator, _END)
                if chunk is _END:
                    iterator = None
                    break
                response.chunks.append(chunk)
                collected += len(chunk)
            response.iterator = iterator
        except Exception:  # noqa: BLE001
            log.exception("the application failed while responding")
            response.close()
            return _internal_error()
        if response.status is None:
            response.close()
            return _internal_error()
        return response


def _internal_error() -> _Response:
    response = _Response()
    response.status = 500
    response.headers = [(b"content-type", b"application/json")]
    response.chunks = [b'{"error": {"code": "E_INTERNAL", "message": "An internal error '
                       b'occurred."}}']
    return response


async def _plain_error(send: Callable, status: int, code: str, message: str) -> None:
    """An error the bridge answers itself (the app never saw the request)."""
    body = ('{"error": {"code": "%s", "message": "%s"}}' % (code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _header_items(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    environ: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name in ("CONTENT_TYPE", "CONTENT_LENGTH", "TRANSFER_ENCODING"):
            if name == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
            continue                                  # framing is the bridge's business
        key = "HTTP_" + name
        if key in environ:
            environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
        else:
            environ[key] = value
    return environ


def _environ(scope: dict, body: Any, length: int) -> dict[str, Any]:
    """A PEP 3333 environ for a request whose body (if any) is fully buffered in ``body``."""
    raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
    path = unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("latin-1")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root,
        "PATH_INFO": path,
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] if len(server) > 1 and server[1] is not None else 80),
        "SERVER_PROTOCOL": "HTTP/" + scope.get("http_version", "1.1"),
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(length),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        # Over the limit the app sees the declared length and no bytes: it answers 413.
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
    }
    environ.update(_header_items(scope.get("headers", ())))
    return environ


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return default          # gunicorn.conf.py refuses bad values before any worker starts


def create_asgi_app(test_config: dict[str, Any] | None = None) -> WsgiBridge:
    """What gunicorn serves (``app.asgi:create_asgi_app()``): the app factory's Flask app
    behind the bridge, sized by the same ``CONVSCOPE_*`` variables gunicorn.conf.py reads."""
    from app import create_app

    return WsgiBridge(create_app(test_config),
                      threads=int(_env_number("CONVSCOPE_THREADS", 8)),
                      read_timeout=_env_number("CONVSCOPE_READ_TIMEOUT", 20.0),
                      drain_max_bytes=int(_env_number("CONVSCOPE_DRAIN_MAX_MB", 256) * 2**20))
