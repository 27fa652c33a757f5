"""``build_app(test_config)``: settings, services and blueprints for one Flask app.

Nothing happens at import time. The app is assembled by a list of ``init_app(app, settings)``
hooks (``INIT_HOOKS``), run in order, so later features (authentication, allowed hosts, ...) are
one more entry rather than an edit in the middle of this function. Per-app state lives in
``app.extensions["convscope"]`` as a ``Services`` object (``app.services``); nothing is global.
This module is the top of the import graph: it imports the views, and nothing imports it but
``app.create_app``.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

from flask import Flask

from app import auth, http_errors
from app.jobs.executor import Executor
from app.services import EXTENSION, build_services
from app.settings import Settings, load_settings
from app.views import init_app as init_views
from app.views import security

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent   # templates/ and static/ live here


def init_config(app: Flask, settings: Settings) -> None:
    app.config.update(
        SECRET_KEY=settings.secret_key,
        TESTING=settings.testing,
        MAX_CONTENT_LENGTH=int(settings.max_request_mb * 1024 * 1024),
        # Each uploaded file is one part; leave room for form fields (params, labels).
        MAX_FORM_PARTS=settings.max_files_per_request + 200,
        SESSION_COOKIE_HTTPONLY=True,
        # Lax, not Strict: a link to a job page from chat or mail still finds the login.
        # Cross-site state changes are refused by app.views.security regardless.
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_NAME="convscope_session",
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(hours=settings.session_hours),
    )
    app.json.sort_keys = False      # keep our key order (Flask 3 has no JSON_SORT_KEYS config)
    _warn_about_deployment(settings)


def running_under_gunicorn() -> bool:
    """gunicorn's arbiter exports SERVER_SOFTWARE=gunicorn/<version> to its workers."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


def _warn_about_deployment(settings: Settings) -> None:
    """Production mode is explicit (CONVSCOPE_ENV=production); say so when it looks missing."""
    if running_under_gunicorn() and not settings.production:
        log.warning("Running under gunicorn without CONVSCOPE_ENV=production: the production "
                    "checks (secret key, no debug mode) are off.")
    if settings.production and not settings.auth_enabled:
        log.warning("CONVSCOPE_ENV=production without CONVSCOPE_AUTH_TOKEN: anyone who can reach "
                    "the server can use it; put it behind an authenticating proxy or set a token.")


def init_services(app: Flask, settings: Settings, *, catalog: Any = None) -> None:
    """Services and the job backend: the embedded executor, or with ``CONVSCOPE_BROKER_URL``
    Celery workers (``app.jobs.broker``), in which case this process never loads a model."""
    if settings.broker_url:
        from app.jobs.broker import BrokerBackend

        services = build_services(settings, catalog=catalog, web_only=True)
        backend = BrokerBackend(services)
        services.executor = backend
        app.extensions[EXTENSION] = services
        return
    services = build_services(settings, catalog=catalog)
    executor = Executor(services)
    services.executor = executor
    app.extensions[EXTENSION] = services
    executor.start()
    if not settings.testing:
        # Cancel and record running jobs when the process exits normally.
        ref = weakref.ref(executor)
        atexit.register(lambda: (executor_ := ref()) and executor_.shutdown(5.0))


InitHook = Callable[[Flask, Settings], None]

# Order matters: config, error handlers, request checks, then routes and services.
INIT_HOOKS: list[InitHook] = [
    init_config,
    http_errors.init_app,
    security.init_app,      # allowed hosts first, then cross-site/CSRF checks and headers
    auth.init_app,          # login routes and the token/session check
    init_views,
]


def build_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build a new app from ``CONVSCOPE_*`` settings overridden by ``test_config``.

    ``test_config`` may also hold ``"catalog"``: an object with ModelCatalog's interface used
    instead of scanning a directory (tests).
    """
    config = dict(test_config or {})
    catalog = config.pop("catalog", None)
    settings = load_settings(config)
    app = Flask("app", root_path=str(PROJECT_ROOT), template_folder="templates",
                static_folder="static")
    for hook in INIT_HOOKS:
        hook(app, settings)
    init_services(app, settings, catalog=catalog)
    return app
