"""convscope's application layer: the Flask app, jobs, stores, rendering and the CLI.

Importing this package is cheap and pulls in neither Flask nor torch, so plugins may use
``app.errors``. ``create_app()`` builds the Flask app; gunicorn serves it through
``app.asgi:create_asgi_app()`` (see gunicorn.conf.py).
"""
from __future__ import annotations

from typing import Any

from app.version import __version__

__all__ = ["__version__", "create_app"]


def create_app(test_config: dict[str, Any] | None = None):  # -> flask.Flask
    """Build a new Flask application (see ``app.factory``)."""
    from app.factory import build_app

    return build_app(test_config)
