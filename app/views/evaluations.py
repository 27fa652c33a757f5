"""Dataset mode over HTTP: the datasets (``/datasets``), evaluations (``/evaluations/<id>``) and
their JSON twins under ``/api/v1``.

API::

    GET    /api/v1/datasets                          {"datasets": [{"id", "name", "images", "classes", ...}]}
    POST   /api/v1/evaluations                       {"model", "dataset", "top_k"?} -> 202 {"id", "url", "api_url"}
    GET    /api/v1/evaluations/<id>                  {"id", "status", "progress", ...} + evaluation.json when done
    DELETE /api/v1/evaluations/<id>                  cancel
    GET    /api/v1/evaluations/<id>/thumbnails/<n>   image n as a small JPEG (by number, never by path)
    POST   /api/v1/evaluations/<id>/explain          {"images": [n, ...], "visualizations"?} -> 202 a job

Evaluations are jobs of kind ``evaluate`` on the same backend as visualizations (queue limit,
progress, cancel, restart survival). The pages work without JavaScript: forms post, the running
evaluation's page refreshes itself; ``static/js/evaluation.js`` adds live progress.
"""
from __future__ import annotations

import io
from typing import Any

from flask import (Blueprint, Response, current_app, jsonify, redirect, render_template,
                   request, url_for)

from app.dataset_catalog import DatasetCatalog
from app.datasets import read_dataset_file
from app.errors import BadRequest, ConvscopeError, NotFound
from app.http_errors import coded_error
from app.ingest import DEFAULT_MAX_BYTES, decode_image
from app.jobs.record import TERMINAL
from app.services import services
from app.views.evaluation_presenters import dataset_listing, evaluation_page, evaluation_view
from app.views.evaluation_requests import (evaluation_job, finished_outcome,
                                           parse_evaluation_request, parse_explain_request)

evaluations_api = Blueprint("evaluations_api", __name__, url_prefix="/api/v1")
evaluations = Blueprint("evaluations", __name__)

THUMBNAIL_PX = 160


def _services():
    return services(current_app)


def _json_body() -> Any:
    if not request.is_json:
        raise coded_error("E_UNSUPPORTED_MEDIA_TYPE", 415,
                          "Send the request as JSON (Content-Type: application/json).")
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("The request body is not valid JSON.")
    return body


def _created(job: Any, page: str, api: str) -> tuple[Response, int, dict[str, str]]:
    api_url = url_for(api, job_id=job.id)
    return (jsonify(id=job.id, url=url_for(page, job_id=job.id), api_url=api_url), 202,
            {"Location": api_url})


# --- API ----------------------------------------------------------------------------------------

@evaluations_api.get("/datasets")
def datasets_json() -> Response:
    return jsonify(datasets=dataset_listing(_services()))


@evaluations_api.post("/evaluations")
def create_evaluation() -> tuple[Response, int, dict[str, str]]:
    svc = _services()
    job = svc.executor.submit(parse_evaluation_request(_json_body(), svc))
    return _created(job, "evaluations.evaluation", "evaluations_api.evaluation")


@evaluations_api.get("/evaluations/<job_id>")
def evaluation(job_id: str) -> Response:
    """``?images=0`` leaves out the per-image list (polling clients)."""
    svc = _services()
    images = request.args.get("images", "1") not in ("0", "false", "no")
    return jsonify(evaluation_view(evaluation_job(svc, job_id), svc, images=images))


@evaluations_api.delete("/evaluations/<job_id>")
def cancel_evaluation(job_id: str) -> Response:
    svc = _services()
    evaluation_job(svc, job_id)
    return jsonify(evaluation_view(svc.executor.cancel(job_id), svc, images=False))


@evaluations_api.get("/evaluations/<job_id>/thumbnails/<int:number>")
def thumbnail(job_id: str, number: int) -> Response:
    """A small JPEG of image ``number``, read from the dataset again (the path is the one the
    evaluation recorded, inside its dataset folder)."""
    svc = _services()
    job = evaluation_job(svc, job_id)
    records = finished_outcome(svc, job).records
    if not 0 <= number < len(records):
        raise NotFound("This evaluation has no image with this number.")
    root = DatasetCatalog.from_settings(svc.settings).get(job.spec.dataset_id).path
    data = read_dataset_file(root, records.paths[number], DEFAULT_MAX_BYTES)
    image, _ = decode_image(data, max_side=2 * THUMBNAIL_PX)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    response = Response(buffer.getvalue(), mimetype="image/jpeg")
    # Not immutable: the file in the dataset may change; a few minutes of caching is safe.
    response.headers["Cache-Control"] = "private, max-age=300"
    return response


@evaluations_api.post("/evaluations/<job_id>/explain")
def explain(job_id: str) -> tuple[Response, int, dict[str, str]]:
    svc = _services()
    spec = parse_explain_request(_json_body(), evaluation_job(svc, job_id), svc)
    return _created(svc.executor.submit(spec), "pages.job", "api.job")


# --- pages --------------------------------------------------------------------------------------

def _render_datasets(error: ConvscopeError | None = None, status: int = 200) -> tuple[str, int]:
    svc = _services()
    entries = svc.scanned_catalog().entries()
    wanted = request.values.get("model")
    selected = next((entry for entry in entries if entry.ok and wanted in (entry.id, entry.file)),
                    next((entry for entry in entries if entry.ok), None))
    datasets = dataset_listing(svc, selected.meta if selected is not None else None)
    html = render_template("pages/datasets.html", datasets=datasets, models=entries,
                           selected=selected, error=error,
                           configured=DatasetCatalog.from_settings(svc.settings).root is not None)
    return html, status


@evaluations.get("/datasets")
def datasets() -> tuple[str, int]:
    return _render_datasets()


@evaluations.post("/datasets")
def submit_evaluation() -> Response | tuple[str, int]:
    svc = _services()
    try:
        spec = parse_evaluation_request({"model": request.form.get("model") or "latest",
                                         "dataset": request.form.get("dataset", "")}, svc)
        job = svc.executor.submit(spec)
    except ConvscopeError as error:
        return _render_datasets(error, error.http_status)
    return redirect(url_for("evaluations.evaluation", job_id=job.id), code=303)


def _render_evaluation(job_id: str, error: ConvscopeError | None = None,
                       status: int = 200) -> tuple[str, int]:
    svc = _services()
    job = evaluation_job(svc, job_id)
    view = evaluation_view(job, svc, images=False)
    sections = None
    if view["status"] == "done" and not view["expired"]:
        sections = evaluation_page(view, finished_outcome(svc, job), request.args)
    entry = None
    try:
        entry = svc.scanned_catalog().get(job.spec.model_id)
    except ConvscopeError:
        pass        # the checkpoint is gone: the page still shows the evaluation
    methods = []
    if entry is not None and entry.meta is not None:
        for visualization in svc.visualizations:
            reason = visualization.supports(entry.meta)
            methods.append({"name": visualization.name, "title": visualization.title,
                            "unsupported_reason": reason})
    html = render_template("pages/evaluation.html", evaluation=view, sections=sections,
                           finished=view["status"] in TERMINAL, methods=methods, error=error,
                           max_images=svc.settings.max_images_per_job,
                           chosen=set(request.form.getlist("image")))
    return html, status


@evaluations.get("/evaluations/<job_id>", endpoint="evaluation")
def evaluation_page_view(job_id: str) -> tuple[str, int]:
    return _render_evaluation(job_id)


@evaluations.post("/evaluations/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    svc = _services()
    evaluation_job(svc, job_id)
    svc.executor.cancel(job_id)
    return redirect(url_for("evaluations.evaluation", job_id=job_id), code=303)


@evaluations.post("/evaluations/<job_id>/explain")
def explain_form(job_id: str) -> Response | tuple[str, int]:
    """The Explain button: the checked images and methods become a job; go to its page."""
    svc = _services()
    try:
        job = evaluation_job(svc, job_id)
        payload = {"images": request.form.getlist("image"),
                   "visualizations": [{"name": name} for name in request.form.getlist("method")]}
        if not payload["images"]:
            raise BadRequest("Select at least one image to explain.",
                             fields={"images": "one or more"})
        spec = parse_explain_request(payload, job, svc)
        created = svc.executor.submit(spec)
    except NotFound:
        raise
    except ConvscopeError as error:
        return _render_evaluation(job_id, error, error.http_status)
    return redirect(url_for("pages.job", job_id=created.id), code=303)

