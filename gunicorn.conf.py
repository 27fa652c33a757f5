"""gunicorn settings for the convscope team service.

    gunicorn -c gunicorn.conf.py            # serves 'app.asgi:create_asgi_app()'

Why these choices:

- An asyncio worker (``app.gunicorn_worker.ConvscopeWorker``: gunicorn's own ASGI worker plus
  a header deadline and a connection cap), not ``gthread``. The threaded worker gives each
  connection a thread while it reads the request: eight clients trickling headers, or sending
  less body than they announced, took the service offline. Here the event loop waits on
  clients; the Flask app runs behind a WSGI bridge (app/asgi.py) that buffers each request body
  before calling it and hands its response back piece by piece, so the HTTP threads
  (``CONVSCOPE_THREADS``) only ever run application code. Health and readiness have threads of
  their own.
- Slow or silent clients are dropped: request headers must be complete within
  ``CONVSCOPE_READ_TIMEOUT`` (20 s) of connecting, a body may not pause that long (nor trickle
  slower than 32 KiB/s after it), and a client that reads nothing of its response for that long
  is dropped too. Idle keep-alive connections close after ``CONVSCOPE_KEEPALIVE`` (5 s).
- One worker per device: each worker owns one executor and one device, so two workers would load
  the model twice and fight over one GPU. With several GPUs, worker *k* gets ``cuda:k``.
- No ``preload_app``: the app factory (and so torch/CUDA) runs in each worker after the fork,
  never in the master. The master counts GPUs from ``CUDA_VISIBLE_DEVICES`` or
  ``/proc/driver/nvidia/gpus`` without importing torch; the worker class imports only gunicorn.
- ``graceful_timeout`` matches the container's stop grace (``docker run --stop-timeout``, set it a
  few seconds longer): on SIGTERM a worker stops accepting, finishes in-flight requests, then the
  ``worker_exit`` hook cancels queued and running jobs with a recorded status.
- Logs (access, gunicorn and application) go to stdout, for ``docker logs``/journald.
- A body over ``CONVSCOPE_MAX_REQUEST_MB`` is refused with the app's own 413 before it is read;
  the rest of it is then read and discarded (bounded by ``CONVSCOPE_DRAIN_MAX_MB`` and 15 s), so
  a client still uploading can finish and read the error instead of meeting a connection reset.

Every value can be overridden by the environment variables named below (``CONVSCOPE_*``).
"""
from __future__ import annotations

import importlib.metadata
import itertools
import os
from typing import Any, Mapping


def _int_env(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"convscope: {name} must be an integer, got {raw[:40]!r}") from None
    if value < 1:
        raise SystemExit(f"convscope: {name} must be at least 1, got {value}")
    return value


def _torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, from its version string (no import)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "+cpu" not in version


def visible_gpu_count(environ: Mapping[str, str] = os.environ,
                      proc_gpus: str = "/proc/driver/nvidia/gpus",
                      torch_has_cuda: bool | None = None) -> int:
    """GPUs this server may use, counted without initializing CUDA (the master must not)."""
    device = environ.get("CONVSCOPE_DEVICE", "auto").strip().lower()
    if device not in ("auto", "cuda"):
        return 0            # cpu, or one explicit cuda:N
    if not (_torch_has_cuda() if torch_has_cuda is None else torch_has_cuda):
        return 0
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for item in visible.split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break       # CUDA stops at the first invalid entry, as "-1" means "none"
            ids.append(item)
        return len(ids)
    try:
        return len(os.listdir(proc_gpus))
    except OSError:
        return 0


def default_workers(environ: Mapping[str, str] = os.environ, **probe: Any) -> int:
    return _int_env("CONVSCOPE_WORKERS", max(1, visible_gpu_count(environ, **probe)), environ)


def worker_device(slot: int, gpu_count: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """The CONVSCOPE_DEVICE a worker in ``slot`` should use, or None to leave it as set."""
    device = environ.get("CONVSCOPE_DEVICE", "auto").strip().lower()
    if gpu_count > 1 and device in ("auto", "cuda"):
        return f"cuda:{slot % gpu_count}"
    return None


def first_free_slot(used: set[int]) -> int:
    return next(slot for slot in itertools.count() if slot not in used)


def _float_env(name: str, default: float, environ: Mapping[str, str] = os.environ) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"convscope: {name} must be a number, got {raw[:40]!r}") from None
    if not 0 < value <= 3600:
        raise SystemExit(f"convscope: {name} must be between 0 and 3600, got {value:g}")
    return value


_GPU_COUNT = visible_gpu_count()
# Checked here, in the master, so a bad value stops start-up; the workers read them again.
_int_env("CONVSCOPE_DRAIN_MAX_MB", 256)
_float_env("CONVSCOPE_READ_TIMEOUT", 20.0)
_LOG_LEVEL = os.environ.get("CONVSCOPE_LOG_LEVEL", "info").upper()

wsgi_app = "app.asgi:create_asgi_app()"
bind = [os.environ.get("CONVSCOPE_BIND", "127.0.0.1:8000")]
worker_class = "app.gunicorn_worker.ConvscopeWorker"
workers = default_workers()
# The bridge's application threads per worker (app/asgi.py), not gunicorn's: the asyncio worker
# itself has none, so gunicorn's own ``threads`` stays 1.
_int_env("CONVSCOPE_THREADS", 8)
threads = 1
# Open connections per worker; past it new ones get 503 at once (no file-descriptor exhaustion).
worker_connections = _int_env("CONVSCOPE_MAX_CONNECTIONS", 1000)
# The bridge runs its own lifespan (it starts nothing; jobs are cancelled in worker_exit).
asgi_lifespan = "on"
# Plain asyncio: uvloop is not a dependency, and "auto" would pick it up if it were installed.
asgi_loop = "asyncio"
# The master kills a worker whose main loop is silent this long; app start-up (scanning the
# checkpoint directory) happens before the loop, so leave it room. Requests are not bounded by it.
timeout = _int_env("CONVSCOPE_WORKER_TIMEOUT", 120)
graceful_timeout = _int_env("CONVSCOPE_GRACEFUL_TIMEOUT", 30)
# Idle keep-alive connections are closed after this many seconds (and a new request on one must
# have sent its headers by then). A proxy that keeps upstream
# connections open must drop idle ones sooner (nginx: upstream keepalive_timeout below it),
# or a request sent just as gunicorn closes one meets a connection reset.
keepalive = _int_env("CONVSCOPE_KEEPALIVE", 5)
preload_app = False
# The admin control socket (gunicorn 25.1+) is not needed and is one more thing to secure.
control_socket_disable = True
# The heartbeat file lives in memory when /dev/shm exists (a disk-backed tmp can stall workers).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
accesslog = "-"
errorlog = "-"
loglevel = _LOG_LEVEL.lower()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": _LOG_LEVEL, "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {"level": _LOG_LEVEL, "handlers": ["stdout"], "propagate": False,
                           "qualname": "gunicorn.error"},
        "gunicorn.access": {
            "level": "INFO" if os.environ.get("CONVSCOPE_ACCESS_LOG", "1") != "0" else "WARNING",
            "handlers": ["stdout"], "propagate": False, "qualname": "gunicorn.access"},
    },
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "generic",
                            "stream": "ext://sys.stdout"}},
    "formatters": {"generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] "
                                         "%(name)s: %(message)s",
                               "datefmt": "%Y-%m-%d %H:%M:%S %z"}},
}


# --- server hooks ------------------------------------------------------------------------------

def pre_fork(server: Any, worker: Any) -> None:
    """In the master: give the new worker the lowest device slot no live worker holds, so a
    replacement for a killed worker takes over its GPU."""
    used = {getattr(other, "convscope_slot", None) for other in server.WORKERS.values()}
    worker.convscope_slot = first_free_slot({slot for slot in used if slot is not None})


def post_fork(server: Any, worker: Any) -> None:
    """In the worker, before the app is built: pin it to its device."""
    device = worker_device(getattr(worker, "convscope_slot", 0), _GPU_COUNT)
    if device is not None:
        os.environ["CONVSCOPE_DEVICE"] = device
        server.log.info("worker %s uses %s", worker.pid, device)


def worker_exit(server: Any, worker: Any) -> None:
    """After the worker stopped serving: cancel queued and running jobs, recording why.

    Runs in the worker (and, for a worker that vanished, in the master, where no app exists)."""
    app = getattr(worker, "asgi", None) or getattr(worker, "wsgi", None)
    app = getattr(app, "flask_app", app)          # the Flask app behind the WSGI bridge
    extensions = getattr(app, "extensions", None) or {}
    services = extensions.get("convscope")
    if services is not None:
        # Cancellation is cooperative (between batches); stay inside the grace period.
        services.shutdown(timeout=max(1.0, graceful_timeout / 3))
