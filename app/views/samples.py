"""Sample images for the workbench: the bundled public-domain demo photos (``demo/images``).

A new user can try convscope without images at hand: the workbench shows the samples as small
buttons, and its script fetches the chosen sample from ``GET /samples/<name>`` and sends the
bytes through the ordinary upload (``POST /api/v1/images``), so a sample is ingested,
validated and stored exactly like a file the user picked. ``GET /api/v1/samples`` lists them.

The table of samples is built once, when the app starts, from the image files in the folder;
a request's name is only ever a key into that table, never part of a path. The files are
public-domain static assets, so ``/samples/<name>`` stays open like ``/static`` when a token is
configured (``app.auth.OPEN_ENDPOINTS``); the JSON listing is an API call like any other.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, send_file, url_for

from app.errors import NotFound

EXTENSION = "convscope_samples"
# Suffix -> content type. Only these are served; anything else in the folder is ignored.
SAMPLE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
                ".webp": "image/webp"}
# Plain names only: no dot files, no separators, nothing a URL or a page could misread.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.[A-Za-z]{3,4}")
# Titles for the bundled photos (see demo/images/SOURCES.md); other files use their stem.
SAMPLE_TITLES = {
    "chelsea": "Chelsea the cat",
    "coffee": "A cup of espresso",
    "astronaut": "Astronaut Eileen Collins",
    "rocket": "A Falcon 9 rocket launch",
    "grace_hopper": "Grace Hopper",
}
# The files are part of a release and rarely change; a day of caching (revalidated by ETag).
SAMPLE_CACHE_CONTROL = "public, max-age=86400"

samples = Blueprint("samples", __name__)


@dataclass(frozen=True)
class Sample:
    name: str           # the file name, also the URL key
    title: str
    path: Path
    mimetype: str


def sample_directory() -> Path:
    """The bundled demo photos, next to the demo checkpoint."""
    from app.catalog import demo_directory

    return demo_directory() / "images"


def _title(stem: str) -> str:
    return SAMPLE_TITLES.get(stem) or stem.replace("_", " ").replace("-", " ").capitalize()


def build_sample_table(directory: Path) -> dict[str, Sample]:
    """Every plainly named image file directly in ``directory`` (no symlinks, no subfolders),
    the known photos first in ``SAMPLE_TITLES`` order, then by name. Empty if it is missing."""
    try:
        candidates = sorted(directory.iterdir())
    except OSError:
        return {}
    found = []
    for path in candidates:
        mimetype = SAMPLE_TYPES.get(path.suffix.lower())
        if mimetype is None or not _SAFE_NAME.fullmatch(path.name):
            continue
        if path.is_symlink() or not path.is_file():
            continue
        found.append(Sample(path.name, _title(path.stem), path, mimetype))
    order = list(SAMPLE_TITLES)
    found.sort(key=lambda s: (order.index(s.path.stem) if s.path.stem in order else len(order),
                              s.name))
    return {sample.name: sample for sample in found}


def sample_table() -> dict[str, Sample]:
    return current_app.extensions[EXTENSION]


def sample_list() -> list[dict[str, str]]:
    """``[{"name", "url", "title"}]`` in display order (also a template global)."""
    return [{"name": s.name, "url": url_for("samples.sample", name=s.name), "title": s.title}
            for s in sample_table().values()]


@samples.get("/samples/<name>")
def sample(name: str) -> Response:
    found = sample_table().get(name)
    if found is None:
        raise NotFound("There is no sample image with this name.")
    try:
        response = send_file(found.path, mimetype=found.mimetype, conditional=True,
                             max_age=86400, download_name=found.name)
    except FileNotFoundError:
        raise NotFound("This sample image is no longer available.") from None
    # The sandboxing Content-Security-Policy and nosniff come from app.views.security.
    response.headers["Cache-Control"] = SAMPLE_CACHE_CONTROL
    return response


@samples.get("/api/v1/samples")
def list_samples() -> Response:
    return jsonify(samples=sample_list())


def init_app(app: Flask, settings: Any, directory: Path | None = None) -> None:
    """Build the sample table (once) and register the routes and the template global."""
    app.extensions[EXTENSION] = build_sample_table(directory or sample_directory())
    app.jinja_env.globals["sample_images"] = sample_list
    app.register_blueprint(samples)
