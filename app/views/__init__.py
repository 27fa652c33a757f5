"""HTTP views: the HTML pages and their JSON twins under ``/api/v1``."""
from __future__ import annotations

import datetime
from typing import Any

from flask import Flask


def isotime(timestamp: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS`` (empty for None)."""
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(float(timestamp)).strftime("%Y-%m-%d %H:%M:%S")


# How long a request waits for the executor's first scan of the checkpoint directory before
# answering 503: a first scan loads every checkpoint, which an HTTP thread must never do itself.
CATALOG_WAIT_S = 5.0


def scanned_catalog(services: Any) -> Any:
    """The model catalog once the executor has scanned it; 503 ``E_NOT_READY`` until then."""
    from app.errors import NotReady

    if not services.executor.wait_for_catalog(CATALOG_WAIT_S):
        raise NotReady("The server is still scanning the checkpoint directory; try again "
                       "shortly.", headers={"Retry-After": "2"})
    return services.catalog


def init_app(app: Flask, settings: Any) -> None:
    from app.version import __version__
    from app.views.api import api
    from app.views.pages import pages
    from app.views.samples import init_app as init_samples

    app.jinja_env.filters["isotime"] = isotime
    app.jinja_env.globals["version"] = __version__
    app.register_blueprint(pages)
    app.register_blueprint(api)
    init_samples(app, settings)
