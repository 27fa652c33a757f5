"""The JSON API under ``/api/v1``. Errors are raised as ``app.errors`` classes and turned into
``{"error": {...}}`` responses by ``app.http_errors``; no route builds an error body itself."""
from __future__ import annotations

import json
import re
from typing import Any

from flask import (Blueprint, Response, current_app, jsonify, redirect, request, send_file,
                   url_for)

from app.errors import BadRequest, NotFound, NotReady, PayloadTooLarge
from app.services import services
from app.version import __version__
from app.http_errors import coded_error
from app.views.job_requests import parse_job_request
from app.views.presenters import job_view, model_detail, model_summary
from app.views.uploads import UPLOAD_FIELD, store_uploads

api = Blueprint("api", __name__, url_prefix="/api/v1")

# Content-addressed files never change; a day of browser caching is safe. (Their sandboxing
# Content-Security-Policy and nosniff come from app.views.security, as for every file.)
_IMMUTABLE = "private, max-age=86400, immutable"


def _services():
    return services(current_app)


def _open_to_everyone() -> bool:
    """Probes answer without a token: with authentication on, they say no more than needed."""
    return not _services().settings.auth_enabled


@api.get("/health")
def health() -> Response:
    """Liveness: cheap, never touches a model. Version and device only without authentication
    (they would help someone who cannot sign in to pick an exploit)."""
    if not _open_to_everyone():
        return jsonify(status="ok")
    return jsonify(status="ok", version=__version__, device=str(_services().device))


@api.get("/ready")
def ready() -> Response:
    """Readiness: 503 until the catalog is scanned and the executor runs, and while stopping.
    The queue length only without authentication (it tells outsiders how busy the team is)."""
    executor = _services().executor
    if executor.stopping:
        raise NotReady("The server is shutting down.", headers={"Retry-After": "5"})
    if not executor.ready:
        raise NotReady("The server is starting; try again shortly.",
                       headers={"Retry-After": "1"})
    if not _open_to_everyone():
        return jsonify(status="ready")
    return jsonify(status="ready", queued=executor.queued(), workers=executor.workers())


@api.get("/workers")
def workers() -> Response:
    """Live workers (authenticated like the rest): the embedded executor is one; in broker mode
    every ``convscope worker`` that announced itself in the last few seconds."""
    executor = _services().executor
    return jsonify(workers=executor.workers(), queued=executor.queued())


@api.get("/models")
def models() -> Response:
    catalog = _services().scanned_catalog()
    return jsonify(models=[model_summary(entry) for entry in catalog.entries()])


@api.get("/models/<model_id>")
def model(model_id: str) -> Response:
    return jsonify(model_detail(_services().scanned_catalog().get(model_id)))


@api.get("/visualizations")
def visualizations() -> Response:
    """Every method with its parameters; ``?model=<id>`` fills model-dependent choices
    (e.g. CAM layers) and adds ``supported``/``unsupported_reason``."""
    svc = _services()
    meta = None
    if request.args.get("model"):
        entry = svc.scanned_catalog().get(request.args["model"])
        meta = entry.meta
    described = []
    for visualization in svc.visualizations:
        record = visualization.describe(meta)
        if meta is not None:
            reason = visualization.supports(meta)
            record.update(supported=reason is None, unsupported_reason=reason)
        described.append(record)
    return jsonify(visualizations=described)


@api.post("/images")
def upload_images() -> tuple[Response, int]:
    records = store_uploads(request.files.getlist(UPLOAD_FIELD), _services().images,
                            max_files=_services().settings.max_files_per_request)
    return jsonify(images=[record.to_dict() for record in records]), 201


def _send_stored_file(path: Any, **options: Any) -> Response:
    """``send_file`` for a store entry that eviction may remove between lookup and open."""
    try:
        return send_file(path, conditional=True, max_age=86400, **options)
    except FileNotFoundError:
        raise NotFound("This file was just removed.") from None


@api.get("/images/<image_id>")
def image(image_id: str) -> Response:
    path = _services().images.png_path(image_id)
    # Always image/png: stored images are re-encoded PNGs, whatever was uploaded.
    response = _send_stored_file(path, mimetype="image/png",
                                 download_name=f"{image_id[:16]}.png")
    response.headers["Cache-Control"] = _IMMUTABLE
    return response


# A job is a few hundred bytes of JSON nested four levels deep; anything far beyond that is not
# a job, and a deep enough nesting would exhaust Python's recursion limit while parsing.
MAX_JSON_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32


def _json_body() -> Any:
    """The request's JSON body, or a 4xx with a code for anything else (never a 500)."""
    if not request.is_json:
        raise coded_error("E_UNSUPPORTED_MEDIA_TYPE", 415,
                          "Send the job as JSON (Content-Type: application/json).")
    if (request.content_length or 0) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"A job must be at most {MAX_JSON_BYTES // 1024} KiB of JSON.")
    raw = request.get_data(cache=True)
    if len(raw) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"A job must be at most {MAX_JSON_BYTES // 1024} KiB of JSON.")
    if json_nesting_depth(raw) > MAX_JSON_DEPTH:
        raise BadRequest(f"The JSON is nested more than {MAX_JSON_DEPTH} levels deep.")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):     # UnicodeDecodeError is a ValueError
        raise BadRequest("The request body is not valid JSON.") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_nesting_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in ``raw`` (brackets inside strings do not count);
    a linear scan, so malformed input is measured as well as valid input."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")


@api.post("/jobs")
def create_job() -> tuple[Response, int, dict[str, str]]:
    svc = _services()
    spec = parse_job_request(_json_body(), catalog=svc.scanned_catalog(), images=svc.images,
                             settings=svc.settings, visualizations=svc.visualizations)
    job = svc.executor.submit(spec)
    page = url_for("pages.job", job_id=job.id)
    return (jsonify(id=job.id, url=page, api_url=url_for("api.job", job_id=job.id)), 202,
            {"Location": url_for("api.job", job_id=job.id)})


@api.get("/jobs/<job_id>")
def job(job_id: str) -> Response:
    svc = _services()
    found = svc.jobs.get(job_id)
    if found.kind == "evaluate":        # dataset mode has its own view of its jobs
        return redirect(url_for("evaluations_api.evaluation", job_id=job_id), code=303)
    if found.kind == "timeline":
        return redirect(url_for("timelines_api.timeline_json", job_id=job_id), code=303)
    if found.kind == "sanity":
        return redirect(url_for("sanity_api.check", job_id=job_id), code=303)
    return jsonify(job_view(found, svc))


@api.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    svc = _services()
    kind = svc.jobs.get(job_id).kind
    if kind == "evaluate":
        return redirect(url_for("evaluations_api.cancel_evaluation", job_id=job_id), code=307)
    if kind == "timeline":
        return redirect(url_for("timelines_api.cancel_timeline", job_id=job_id), code=307)
    if kind == "sanity":
        return redirect(url_for("sanity_api.cancel_check", job_id=job_id), code=307)
    return jsonify(job_view(svc.executor.cancel(job_id), svc))


@api.get("/results/<key>/<name>")
def result_file(key: str, name: str) -> Response:
    path, mimetype = _services().results.file(key, name)
    as_attachment = not mimetype.startswith("image/")
    response = _send_stored_file(path, mimetype=mimetype, as_attachment=as_attachment,
                                 download_name=f"{key[:12]}-{name}")
    response.headers["Cache-Control"] = _IMMUTABLE
    return response

