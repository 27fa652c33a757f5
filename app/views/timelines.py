"""The learning process over HTTP: the Timeline page (``/timelines``), one timeline
(``/timelines/<id>``) with its Compare-two-checkpoints view, and their JSON twins.

API::

    POST   /api/v1/timelines            the request of app.views.timeline_requests
                                        -> 202 {"id", "url", "api_url"}
    GET    /api/v1/timelines/<id>       {"id", "kind", "status", "progress", "model_runs",
                                         "cache_hits", "error", "timeline": <document> | null}
    DELETE /api/v1/timelines/<id>       cancel
    POST   /timelines/<id>/extend       (a form post; with ``Accept: application/json``, as the
                                        page's Follow training sends it) -> 202 {"id", "url",
                                        "api_url"} of the extended timeline, else 303 to its page
    GET    /api/v1/timelines/<id>/frames/<image>/<method>/<panel>/<step>.png
                                        one frame on its strip's shared colour scale
    GET    /api/v1/timelines/<id>/difference/<image>/<method>/<panel>.png?a=<step>&b=<step>
                                        step b's map minus step a's (signed, symmetric scale)
    GET    /api/v1/timelines/<id>/flips?a=<checkpoint>&b=<checkpoint>
                                        {"from", "to", "right_to_wrong", "wrong_to_right"}

The document is ``timeline.json``'s (``app.timeline_cli``) with, per panel, the ``result_key``
of the stored visualization its files belong to (``GET /api/v1/results/<key>/<name>``), and per
step the ``prediction_key``. Timelines are jobs of kind ``timeline`` on the same backend as every
other job (queue limit, progress, cancel, restart survival); their results are the stored
visualizations any job reuses.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from flask import (Blueprint, Response, current_app, jsonify, redirect, render_template,
                   request, url_for)

from app.errors import BadRequest, ConvscopeError, NotFound
from app.http_errors import coded_error, wants_json
from app.jobs.record import TERMINAL
from app.jobs.timeline import CORRECT_FILE
from app.services import services
from app.timeline import difference_map, flips_between, render_frame, strip_range
from app.views.timeline_requests import parse_timeline_request, timeline_job, timeline_outcome

timelines_api = Blueprint("timelines_api", __name__, url_prefix="/api/v1")
timelines = Blueprint("timelines", __name__)

_IMMUTABLE = "private, max-age=31536000, immutable"


def _services():
    return services(current_app)


def _created(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """202 with where a new timeline's page and JSON are (the API's answer to a submission)."""
    api_url = url_for("timelines_api.timeline_json", job_id=job_id)
    return (jsonify(id=job_id, url=url_for("timelines.timeline", job_id=job_id),
                    api_url=api_url), 202, {"Location": api_url})


def _json_body() -> Any:
    if not request.is_json:
        raise coded_error("E_UNSUPPORTED_MEDIA_TYPE", 415,
                          "Send the request as JSON (Content-Type: application/json).")
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("The request body is not valid JSON.")
    return body


def timeline_view(job: Any, svc: Any) -> dict[str, Any]:
    """The JSON of one timeline (and the page's data)."""
    record = job.to_record()
    document = None
    if record["status"] == "done" and record["outcome_key"]:
        stored = svc.results.get(record["outcome_key"])
        document = stored.record if stored is not None else None
    return {"id": record["id"], "kind": record["kind"], "status": record["status"],
            "progress": record["progress"], "model_runs": record["model_runs"],
            "cache_hits": record["cache_hits"], "error": record["error"],
            "worker": job.running_worker,
            "created": record["created"], "finished": record["finished"],
            "checkpoints": [{k: c[k] for k in ("model_id", "file", "epoch", "step", "order_by")}
                            for c in record["spec"]["checkpoints"]],
            "expired": record["status"] == "done" and document is None,
            "url": url_for("timelines.timeline", job_id=record["id"]),
            "api_url": url_for("timelines_api.timeline_json", job_id=record["id"]),
            "timeline": document}


# --- frames -------------------------------------------------------------------------------------

def _strip(document: Mapping[str, Any], image: int, method: int, panel: int
           ) -> list[dict[str, Any] | None]:
    """A strip's panel records over the image's steps (None where a step lacks the panel)."""
    images = document["images"]
    if not 0 <= image < len(images):
        raise NotFound("This timeline has no such image.")
    strip = []
    for step in images[image]["steps"]:
        visualizations = step["visualizations"]
        if not 0 <= method < len(visualizations):
            raise NotFound("This timeline has no such method.")
        panels = visualizations[method]["panels"]
        strip.append(panels[panel] if 0 <= panel < len(panels) else None)
    if not any(strip):
        raise NotFound("This timeline has no such panel.")
    return strip


def _values(svc: Any, panel: Mapping[str, Any]) -> np.ndarray:
    path, _ = svc.results.file(panel["result_key"], panel["array"])
    return np.load(path, allow_pickle=False)


def _view(svc: Any, step: Mapping[str, Any]) -> Any:
    from PIL import Image

    path, _ = svc.results.file(step["prediction_key"], "model_view.png")
    with Image.open(path) as image:
        return image.convert("RGB")


def _png(data: bytes) -> Response:
    response = Response(data, mimetype="image/png")
    response.headers["Cache-Control"] = _IMMUTABLE     # a finished timeline never changes
    return response


def _step_number(raw: str | None, count: int, name: str) -> int:
    if raw is None or not raw.isdigit() or not 0 <= int(raw) < count:
        raise BadRequest(f"'{name}' must be a step number from 0 to {count - 1}.",
                         fields={name: f"0 to {count - 1}"})
    return int(raw)


@timelines_api.get("/timelines/<job_id>/frames/<int:image>/<int:method>/<int:panel>/"
                   "<int:step>.png")
def frame(job_id: str, image: int, method: int, panel: int, step: int) -> Response:
    svc = _services()
    document = timeline_outcome(svc, timeline_job(svc, job_id))
    strip = _strip(document, image, method, panel)
    if not 0 <= step < len(strip) or strip[step] is None:
        raise NotFound("This timeline has no such frame.")
    record = strip[step]
    steps = document["images"][image]["steps"]
    if record["kind"] != "heatmap":
        path, _ = svc.results.file(record["result_key"], record["overlay"])
        return _png(path.read_bytes())
    shared = strip_range(strip)
    assert shared is not None
    return _png(render_frame(_values(svc, record), bool(record["signed"]), shared,
                             _view(svc, steps[step])))


@timelines_api.get("/timelines/<job_id>/difference/<int:image>/<int:method>/<int:panel>.png")
def difference(job_id: str, image: int, method: int, panel: int) -> Response:
    svc = _services()
    document = timeline_outcome(svc, timeline_job(svc, job_id))
    strip = _strip(document, image, method, panel)
    first = _step_number(request.args.get("a"), len(strip), "a")
    second = _step_number(request.args.get("b"), len(strip), "b")
    if strip[first] is None or strip[second] is None or strip[first]["kind"] != "heatmap":
        raise NotFound("These steps have no maps to compare.")
    values, value_range = difference_map(_values(svc, strip[first]),
                                         _values(svc, strip[second]))
    return _png(render_frame(values, True, value_range))


@timelines_api.get("/timelines/<job_id>/flips")
def flips(job_id: str) -> Response:
    svc = _services()
    return jsonify(_flips(svc, timeline_job(svc, job_id), request.args))


def _flips(svc: Any, job: Any, args: Mapping[str, str]) -> dict[str, Any] | None:
    document = timeline_outcome(svc, job)
    if document.get("dataset") is None:
        return None
    path, _ = svc.results.file(job.outcome_key, CORRECT_FILE)
    correct = json.loads(path.read_text("utf-8"))
    files = [c["file"] for c in document["checkpoints"] if c["file"] in correct]
    if len(files) < 2:
        return None
    first = _step_number(args.get("a", str(len(files) - 2)), len(files), "a")
    second = _step_number(args.get("b", str(len(files) - 1)), len(files), "b")
    return {"from": files[first], "to": files[second], "a": first, "b": second,
            "files": files, **flips_between(correct[files[first]], correct[files[second]])}


# --- API ----------------------------------------------------------------------------------------

@timelines_api.post("/timelines")
def create_timeline() -> tuple[Response, int, dict[str, str]]:
    svc = _services()
    job = svc.executor.submit(parse_timeline_request(_json_body(), svc))
    return _created(job.id)


@timelines_api.get("/timelines/<job_id>")
def timeline_json(job_id: str) -> Response:
    svc = _services()
    return jsonify(timeline_view(timeline_job(svc, job_id), svc))


@timelines_api.delete("/timelines/<job_id>")
def cancel_timeline(job_id: str) -> Response:
    svc = _services()
    timeline_job(svc, job_id)
    return jsonify(timeline_view(svc.executor.cancel(job_id), svc))


# --- pages --------------------------------------------------------------------------------------

def _form_context(svc: Any) -> dict[str, Any]:
    from app.dataset_catalog import DatasetCatalog

    entries = svc.scanned_catalog().in_training_order()
    latest = next((entry for entry in reversed(entries) if entry.ok), None)
    datasets = []
    catalog = DatasetCatalog.from_settings(svc.settings)
    if catalog.root is not None:
        datasets = [{"id": d.id, "name": d.name} for d in catalog.entries()]
    methods = []
    for visualization in svc.visualizations:
        reason = visualization.supports(latest.meta) if latest is not None else "no model"
        methods.append({"name": visualization.name, "title": visualization.title,
                        "unsupported_reason": reason})
    return {"checkpoints": entries, "latest": latest, "methods": methods, "datasets": datasets,
            "classes": list(latest.meta.class_names) if latest is not None else []}


def _render_form(error: ConvscopeError | None = None, status: int = 200) -> tuple[str, int]:
    svc = _services()
    return render_template("pages/timelines.html", error=error, **_form_context(svc)), status


@timelines.get("/timelines")
def timelines_page() -> tuple[str, int]:
    return _render_form()


def _form_images(svc: Any) -> tuple[list[str], dict[str, str]]:
    """Uploaded files and chosen samples -> stored image ids (and their names)."""
    from app.ingest import ingest_image
    from app.views.samples import sample_table
    from app.views.uploads import UPLOAD_FIELD, store_uploads

    ids: list[str] = []
    names: dict[str, str] = {}
    files = [f for f in request.files.getlist(UPLOAD_FIELD) if f.filename]
    if files:
        for stored in store_uploads(files, svc.images,
                                    max_files=svc.settings.max_images_per_job):
            ids.append(stored.id)
    for name in request.form.getlist("sample"):
        sample = sample_table().get(name)
        if sample is None:
            raise NotFound("There is no sample image with this name.")
        stored = svc.images.put(ingest_image(sample.path.read_bytes(), sample.name))
        ids.append(stored.id)
        names[stored.id] = sample.title
    unique = list(dict.fromkeys(ids))
    return unique, {k: v for k, v in names.items() if k in unique}


@timelines.post("/timelines")
def submit_timeline() -> Response | tuple[str, int]:
    svc = _services()
    try:
        image_ids, names = _form_images(svc)
        target = (request.form.get("target") or "predicted").strip()
        every = request.form.get("every") or "1"
        payload: dict[str, Any] = {
            "images": image_ids, "filenames": names or None,
            "visualizations": [{"name": name} for name in request.form.getlist("method")],
            "targets": [int(target) if target.isdigit() else target],
            "every": int(every) if every.isdigit() else every}
        if request.form.get("dataset"):
            payload["dataset"] = request.form["dataset"]
        job = svc.executor.submit(parse_timeline_request(payload, svc))
    except ConvscopeError as error:
        return _render_form(error, error.http_status)
    return redirect(url_for("timelines.timeline", job_id=job.id), code=303)


@timelines.post("/timelines/<job_id>/extend")
def extend(job_id: str) -> Response | tuple[Response, int, dict[str, str]]:
    """The same timeline over the checkpoints listed now (new ones from a running training):
    every checkpoint computed before comes from the store. The page's Follow training posts
    this form asking for JSON and stays where it is; a plain form post goes to the new page."""
    svc = _services()
    job = timeline_job(svc, job_id)
    spec = job.spec
    payload: dict[str, Any] = {
        "images": list(spec.images), "filenames": dict(zip(spec.images, spec.filenames)),
        "visualizations": [{"name": m.name, "params": dict(m.params)} for m in spec.methods],
        "targets": list(spec.targets)}
    if spec.dataset_id:
        payload["dataset"] = spec.dataset_id
    created = svc.executor.submit(parse_timeline_request(payload, svc))
    if wants_json():
        return _created(created.id)
    return redirect(url_for("timelines.timeline", job_id=created.id), code=303)


@timelines.post("/timelines/<job_id>/explain")
def explain(job_id: str) -> Response:
    """A flipped dataset image on the two checkpoints of the flip: a timeline over just those
    two, so its page shows them side by side with their difference map."""
    from app.dataset_catalog import DatasetCatalog
    from app.datasets import read_dataset_file
    from app.ingest import DEFAULT_MAX_BYTES, ingest_image

    svc = _services()
    job = timeline_job(svc, job_id)
    flips = _flips(svc, job, request.form)
    path = request.form.get("path", "")
    if flips is None or path not in (*flips["right_to_wrong"], *flips["wrong_to_right"]):
        raise NotFound("This image did not flip between these checkpoints.")
    spec = job.spec
    root = DatasetCatalog.from_settings(svc.settings).get(spec.dataset_id).path
    stored = svc.images.put(ingest_image(read_dataset_file(root, path, DEFAULT_MAX_BYTES),
                                         path.rsplit("/", 1)[-1]))
    by_file = {c.file: c.model_id for c in spec.checkpoints}
    payload = {"images": [stored.id], "filenames": {stored.id: path.replace("/", " \u203a ")},
               "visualizations": [{"name": m.name, "params": dict(m.params)}
                                  for m in spec.methods],
               "targets": list(spec.targets),
               "checkpoints": [by_file[flips["from"]], by_file[flips["to"]]]}
    created = svc.executor.submit(parse_timeline_request(payload, svc))
    return redirect(url_for("timelines.timeline", job_id=created.id, a=0, b=1) + "#compare-0",
                    code=303)


@timelines.post("/timelines/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    svc = _services()
    timeline_job(svc, job_id)
    svc.executor.cancel(job_id)
    return redirect(url_for("timelines.timeline", job_id=job_id), code=303)


@timelines.get("/timelines/<job_id>", endpoint="timeline")
def timeline_page(job_id: str) -> str:
    from app.views.timeline_page import page_sections

    svc = _services()
    job = timeline_job(svc, job_id)
    view = timeline_view(job, svc)
    sections = None
    if view["timeline"] is not None:
        sections = page_sections(view, svc, request.args,
                                 flips=_flips(svc, job, request.args))
    return render_template("pages/timeline.html", timeline=view, sections=sections,
                           finished=view["status"] in TERMINAL,
                           follow=request.args.get("follow") == "1")


__all__ = ["timelines", "timelines_api", "timeline_view"]
