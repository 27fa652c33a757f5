"""``convscope serve [DIR]``: the local web server (werkzeug, threaded).

For a laptop: binds 127.0.0.1 unless another ``--host`` is asked for explicitly. A team service
runs gunicorn with the same app factory instead (see gunicorn.conf.py).

Debug mode (``CONVSCOPE_DEBUG=1``: Flask debug, the Werkzeug debugger) is refused on any
address other than a loopback one: the debugger runs code for whoever reaches it.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
from typing import Any

from app.errors import ConvscopeError

log = logging.getLogger(__name__)


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``create_app`` overrides the command line asks for (unset options keep the
    environment's ``CONVSCOPE_*`` values)."""
    overrides: dict[str, Any] = {"device": args.device, "trust_code": bool(args.trust_code)}
    if args.directory is not None:
        overrides["checkpoint_dir"] = args.directory
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "datasets", None):
        overrides["dataset_dir"] = args.datasets
    return overrides


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def debug_refusal(debug: bool, host: str) -> str | None:
    """Why debug mode must not run on ``host`` (None when it may)."""
    if debug and not _is_loopback(host):
        return (f"CONVSCOPE_DEBUG is refused on {host}: the debugger would let anyone who can "
                "reach this address run code. Use a loopback address (127.0.0.1) or turn "
                "debug off.")
    return None


def _request_handler() -> type:
    """werkzeug's request handler without its ``Server: Werkzeug/x Python/y`` banner (versions
    help an attacker pick an exploit; nothing legitimate needs them)."""
    from werkzeug.serving import WSGIRequestHandler

    class QuietRequestHandler(WSGIRequestHandler):
        def version_string(self) -> str:
            return "convscope"

        @property
        def server_version(self) -> str:  # type: ignore[override]  # werkzeug: a property
            return "convscope"

    return QuietRequestHandler


def serve_command(args: argparse.Namespace) -> int:
    from app import create_app
    from app.settings import load_settings


    overrides = settings_from_args(args)
    try:
        settings = load_settings(overrides)
        refusal = debug_refusal(settings.debug, args.host)
        if refusal:
            log.error("E_CONFIG_INVALID: %s", refusal)
            return 2
        app = create_app(overrides)
    except ConvscopeError as error:
        log.error("%s: %s", error.code, error.message)
        return 2
    if not _is_loopback(args.host) and not settings.auth_enabled:
        log.warning("Listening on %s without CONVSCOPE_AUTH_TOKEN: anyone who can reach this "
                    "address can use the server. For a team service use gunicorn with "
                    "authentication.", args.host)
    if not _is_loopback(args.host):
        log.info("Answering requests for IP addresses and the host names %s "
                 "(CONVSCOPE_ALLOWED_HOSTS).", ", ".join(settings.allowed_host_names()) or "none")
    executor = app.extensions["convscope"].executor

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    url_host = args.host if ":" not in args.host else f"[{args.host}]"
    log.info("convscope is serving on http://%s:%d/", url_host, args.port)
    try:
        app.run(host=args.host, port=args.port, threaded=True, debug=settings.debug,
                use_reloader=False, request_handler=_request_handler())
    except KeyboardInterrupt:
        pass
    except OSError as error:
        log.error("Cannot listen on %s:%d: %s", args.host, args.port, error.strerror)
        return 1
    finally:
        executor.shutdown(timeout=10.0)
    return 0
