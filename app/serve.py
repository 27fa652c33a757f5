"""``convscope serve [DIR]``: the local web server (werkzeug, threaded).

For a laptop: binds 127.0.0.1 unless another ``--host`` is asked for explicitly. A team service
runs gunicorn with the same app factory instead (see gunicorn.conf.py).
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
    return overrides


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(args: argparse.Namespace) -> int:
    from app import create_app

    try:
        app = create_app(settings_from_args(args))
    except ConvscopeError as error:
        log.error("%s: %s", error.code, error.message)
        return 2
    if not _is_loopback(args.host):
        log.warning("Listening on %s: anyone who can reach this address can use the server. "
                    "For a team service use gunicorn with authentication.", args.host)
    executor = app.extensions["convscope"].executor

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    url_host = args.host if ":" not in args.host else f"[{args.host}]"
    log.info("convscope is serving on http://%s:%d/", url_host, args.port)
    try:
        app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)
    except KeyboardInterrupt:
        pass
    except OSError as error:
        log.error("Cannot listen on %s:%d: %s", args.host, args.port, error.strerror)
        return 1
    finally:
        executor.shutdown(timeout=10.0)
    return 0
