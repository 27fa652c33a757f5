"""gunicorn's asyncio (ASGI) worker with the deadlines a directly exposed server needs.

gunicorn.conf.py names ``app.gunicorn_worker.ConvscopeWorker`` as the worker class. gunicorn's
own ASGI worker (``-k asgi``) already closes idle keep-alive connections and bounds each wait
for body data; it does not bound how long a new connection may take to send its first request's
headers, nor how many connections one worker holds. This adds both:

- A connection whose request headers are not complete ``read_timeout`` seconds after it opened
  gets 408 and is closed (later requests on a kept-alive connection are bounded by ``keepalive``,
  which gunicorn enforces until their headers are complete).
- Past ``worker_connections`` open connections, a new one gets 503 and is closed at once, so a
  flood cannot exhaust the process's file descriptors (per-client limits are the proxy's job).

The request body and the response are the WSGI bridge's business (app/asgi.py). The worker
imports nothing that loads torch or Flask: the app factory still runs after the fork, in each
worker.
"""
from __future__ import annotations

import os
import resource
from typing import Any

from gunicorn.asgi import protocol as asgi_protocol
from gunicorn.workers import gasgi

READ_TIMEOUT_ENV = "CONVSCOPE_READ_TIMEOUT"
DEFAULT_READ_TIMEOUT_S = 20.0


def read_timeout(environ: Any = os.environ) -> float:
    """Seconds a client may take to send its request headers, or to pause in its body."""
    raw = str(environ.get(READ_TIMEOUT_ENV, "")).strip()
    try:
        value = float(raw) if raw else DEFAULT_READ_TIMEOUT_S
    except ValueError:
        raise SystemExit(f"convscope: {READ_TIMEOUT_ENV} must be a number of seconds, "
                         f"got {raw[:40]!r}") from None
    if not 0 < value <= 3600:
        raise SystemExit(f"convscope: {READ_TIMEOUT_ENV} must be between 0 and 3600 seconds")
    return value


class DeadlineProtocol(asgi_protocol.ASGIProtocol):
    """gunicorn's HTTP/1.1 protocol plus a deadline for the first request's headers and a cap
    on open connections."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._header_deadline = None
        if self.worker.nr_conns > self.worker.worker_connections:
            self._send_error_response(503, "Too many open connections; try again shortly.",
                                      (("Retry-After", "1"),))
            self._close_transport()
            return
        self._header_deadline = self.worker.loop.call_later(
            self.worker.read_timeout, self._headers_too_slow)

    def _on_headers_complete(self) -> Any:
        self._cancel_header_deadline()
        return super()._on_headers_complete()

    def connection_lost(self, exc: Any) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _cancel_header_deadline(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._closed or self._current_request is not None:
            return
        self._send_error_response(408, "The request headers took too long to arrive.")
        self._close_transport()
        if self._request_ready is not None:
            self._request_ready.set()      # let the connection loop see the close and end


class ConvscopeWorker(gasgi.ASGIWorker):
    """gunicorn's ASGI worker serving connections with :class:`DeadlineProtocol`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout()

    def init_process(self) -> None:
        _raise_open_file_limit()
        # gunicorn's worker builds its servers with the protocol class its module names.
        gasgi.ASGIProtocol = DeadlineProtocol
        super().init_process()


def _raise_open_file_limit() -> None:
    """Use the hard limit on open files: each connection is one, and they are cheap here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
