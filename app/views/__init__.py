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


def init_app(app: Flask, settings: Any) -> None:
    from app.version import __version__
    from app.views.api import api
    from app.views.evaluations import evaluations, evaluations_api
    from app.views.pages import pages
    from app.views.samples import init_app as init_samples
    from app.views.timelines import timelines, timelines_api
    from app.views.sanity import init_app as init_sanity

    app.jinja_env.filters["isotime"] = isotime
    app.jinja_env.globals["version"] = __version__
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_blueprint(evaluations)
    app.register_blueprint(evaluations_api)
    app.register_blueprint(timelines)
    app.register_blueprint(timelines_api)
    init_samples(app, settings)
    init_sanity(app)
