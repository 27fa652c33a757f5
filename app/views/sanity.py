"""Sanity checks over HTTP: a button per method on ``/models``, a page per check, and the API.

API::

    POST   /api/v1/sanity        {"model"?, "method", "params"?, "images"?} -> 202 {"id", "url", "api_url"}
    GET    /api/v1/sanity/<id>   {"id", "status", "progress", ...} and, when done, every field
                                 of ``convscope sanity --json``: method, checkpoint, params,
                                 images (a count), steps, passed, threshold
    DELETE /api/v1/sanity/<id>   cancel

``model``: a model id or "latest" (default). ``images``: stored image ids (``POST
/api/v1/images``) or names of the bundled sample photos (``GET /api/v1/samples``); without it
the check runs on the first ``app.sanity.DEFAULT_IMAGES`` sample photos (Chelsea the cat and
the espresso cup), which every server has, so checks of different methods on one checkpoint are
comparable and a repeat is answered from the store. The whole check's model evaluations
(``sanity_cost``, counting the most randomization steps, since a web process never loads a
model) must be within ``CONVSCOPE_MAX_COST`` (E_TOO_EXPENSIVE above).

Sanity checks are jobs of kind ``sanity`` on the same backend as visualizations (queue limit,
progress, cancel, restart survival). Pages work without JavaScript: forms post, a running
check's page refreshes itself. ``/sanity/results/<key>`` shows a stored outcome by its key --
what a panel's "sanity: passed/failed" link opens, which outlives the job record.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from flask import (Blueprint, Flask, Response, current_app, jsonify, redirect, render_template,
                   request, url_for)

from app.errors import BadRequest, ConvscopeError, NotFound, ResultExpired, UnknownModel
from app.ingest import ingest_image
from app.jobs.record import TERMINAL
from app.jobs.sanity import SanitySpec
from app.pipeline import ModelIdentity, meta_fingerprint
from app.sanity import DEFAULT_IMAGES, check_cost, sanity_request
from app.services import services
from app.views.evaluations import _created, _json_body
from app.views.presenters import model_detail
from app.views.sanity_links import panel_sanity
from visualizations.sanity import sanity_cost

if TYPE_CHECKING:
    from app.jobs.record import Job
    from app.services import Services

sanity_api = Blueprint("sanity_api", __name__, url_prefix="/api/v1")
sanity = Blueprint("sanity", __name__)

_REQUEST_FIELDS = {"model", "method", "params", "images"}
# The fields of ``convscope sanity --json`` (``SanityResult.to_dict``), in its order.
RESULT_FIELDS = ("method", "checkpoint", "params", "images", "steps", "passed", "threshold")


def _services() -> "Services":
    return services(current_app)


# --- requests -----------------------------------------------------------------------------------

def parse_sanity_request(payload: Any, svc: "Services",
                         samples: Mapping[str, Any]) -> SanitySpec:
    """``{"model"?, "method", "params"?, "images"?}`` -> a spec, checked completely (model,
    method, parameters, images, cost) before anything is queued. ``samples``: the app's
    sample table (``app.views.samples``)."""
    if not isinstance(payload, Mapping):
        raise BadRequest("The sanity check must be a JSON object.")
    unknown = sorted(str(name)[:40] for name in set(payload) - _REQUEST_FIELDS)
    if unknown:
        raise BadRequest(f"Unknown field {unknown[0]!r}; known: "
                         f"{', '.join(sorted(_REQUEST_FIELDS))}.",
                         fields={name: "unknown field" for name in unknown[:5]})
    model_ref = payload.get("model", "latest")
    if not isinstance(model_ref, str) or not model_ref:
        raise BadRequest("'model' must be a model id or \"latest\".", fields={"model": "an id"})
    entry = svc.scanned_catalog().get(model_ref)
    if not entry.ok or entry.meta is None:
        raise entry.error or UnknownModel("This model could not be loaded.")
    if not isinstance(payload.get("method"), str) or not payload["method"]:
        raise BadRequest("'method' must name a visualization (GET /api/v1/visualizations).",
                         fields={"method": "a visualization name"})
    visualization = svc.visualizations.get(payload["method"])
    method = sanity_request(visualization, payload.get("params"), entry.meta)

    raw_images = payload.get("images")
    limit = svc.settings.max_images_per_job
    if raw_images is None:
        raw_images = list(samples)[:DEFAULT_IMAGES]
        if not raw_images:
            raise BadRequest("This server has no sample photos; name the images to check "
                             "with ('images').", fields={"images": "stored image ids"})
    if (not isinstance(raw_images, list) or not raw_images or len(raw_images) > limit
            or not all(isinstance(name, str) and name for name in raw_images)):
        raise BadRequest(f"'images' must be a list of 1 to {limit} stored image ids or sample "
                         "names.", fields={"images": f"1 to {limit} ids or sample names"})
    check_cost(visualization, method, entry.meta, len(raw_images), svc.settings.max_cost)
    image_ids: list[str] = []
    filenames: list[str] = []
    for name in raw_images:
        image_id, filename = _stored_image(name, svc, samples)
        if image_id in image_ids:
            raise BadRequest("An image is listed twice.", fields={"images": "distinct images"})
        image_ids.append(image_id)
        filenames.append(filename)
    return SanitySpec(model_id=entry.id, model_file=entry.file, checkpoint_sha256=entry.sha256,
                      meta_fingerprint=meta_fingerprint(entry.meta), method=method,
                      images=tuple(image_ids), filenames=tuple(filenames))


def _stored_image(name: str, svc: "Services", samples: Mapping[str, Any]) -> tuple[str, str]:
    """(image id, file name) of a stored image id or a sample photo (stored like an upload)."""
    sample = samples.get(name) or next(
        (found for found in samples.values() if found.path.stem == name), None)
    if sample is None:
        stored = svc.images.get(name)           # NotFound for unknown ids
        return stored.id, stored.filename
    try:
        data = sample.path.read_bytes()
    except OSError:
        raise NotFound("This sample image is no longer available.") from None
    return svc.images.put(ingest_image(data, sample.name)).id, sample.name


def sanity_job(svc: "Services", job_id: str) -> "Job":
    """The sanity-check job with this id (NotFound for any other kind of job)."""
    job = svc.jobs.get(job_id)
    if job.kind != SanitySpec.kind:
        raise NotFound("There is no sanity check with this id.")
    return job


# --- what pages and the API show ----------------------------------------------------------------

def outcome_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored outcome as ``convscope sanity --json`` prints it."""
    return {name: record[name] for name in RESULT_FIELDS}


def sanity_view(job: "Job", svc: "Services") -> dict[str, Any]:
    """``GET /api/v1/sanity/<id>``: status and progress, and when done the result object."""
    record = job.to_record()
    spec: SanitySpec = job.spec                 # type: ignore[assignment]
    view: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "status": record["status"],
        "progress": round(record["progress"], 4), "error": record["error"],
        "url": url_for("sanity.check", job_id=job.id),
        "api_url": url_for("sanity_api.check", job_id=job.id),
        "created": record["created"], "started": record["started"],
        "finished": record["finished"], "model_runs": record["model_runs"],
        "cache_hits": record["cache_hits"], "expired": False,
        "worker": job.running_worker,
        "model": {"id": spec.model_id, "file": spec.model_file,
                  "sha256": spec.checkpoint_sha256},
        "method": spec.method.name, "params": dict(spec.method.params),
        "images": len(spec.images), "image_ids": list(spec.images),
        "filenames": list(spec.filenames)}
    if record["status"] != "done" or not record["outcome_key"]:
        return view
    stored = svc.results.get(record["outcome_key"])
    if stored is None:
        view["expired"] = True
        view["error"] = ResultExpired("This sanity check's result has expired and was removed; "
                                      "run it again.").to_dict()
        return view
    svc.results.touch(stored.key)
    view.update(outcome_fields(stored.record))
    view["result_url"] = url_for("sanity.result", key=stored.key)
    view["targets"] = stored.record.get("targets", [])
    return view


def curve(steps: list[Mapping[str, Any]], threshold: float) -> dict[str, Any]:
    """An inline SVG line chart of Spearman and SSIM per step, starting from the trained model
    (1, 1): points in a 0..100 x 0..50 box, y = 1 at the top and -1 at the bottom."""
    points = [{"randomized": "nothing (the trained model)", "spearman": 1.0, "ssim": 1.0},
              *steps]
    last = max(len(points) - 1, 1)

    def x(number: int) -> float:
        return round(100 * number / last, 2)

    def y(value: float) -> float:
        return round(25 * (1 - max(-1.0, min(1.0, float(value)))), 2)

    return {"spearman": " ".join(f"{x(n)},{y(p['spearman'])}" for n, p in enumerate(points)),
            "ssim": " ".join(f"{x(n)},{y(p['ssim'])}" for n, p in enumerate(points)),
            "threshold_y": y(threshold), "zero_y": y(0.0),
            "dots": [{"x": x(n), "y": y(p["spearman"]), "label": p["randomized"],
                      "value": p["spearman"]} for n, p in enumerate(points)]}


# --- API ----------------------------------------------------------------------------------------

@sanity_api.post("/sanity")
def create_check() -> tuple[Response, int, dict[str, str]]:
    from app.views.samples import sample_table

    svc = _services()
    job = svc.executor.submit(parse_sanity_request(_json_body(), svc, sample_table()))
    return _created(job, "sanity.check", "sanity_api.check")


@sanity_api.get("/sanity/<job_id>", endpoint="check")
def check_json(job_id: str) -> Response:
    svc = _services()
    return jsonify(sanity_view(sanity_job(svc, job_id), svc))


@sanity_api.delete("/sanity/<job_id>")
def cancel_check(job_id: str) -> Response:
    svc = _services()
    sanity_job(svc, job_id)
    return jsonify(sanity_view(svc.executor.cancel(job_id), svc))


# --- pages --------------------------------------------------------------------------------------

def render_models(error: ConvscopeError | None = None, status: int = 200) -> tuple[str, int]:
    """``/models`` again, with ``error`` shown (a refused sanity check)."""
    svc = _services()
    entries = svc.scanned_catalog().entries()
    return render_template("pages/models.html", models=[model_detail(e) for e in entries],
                           workers=svc.executor.workers(), error=error), status


def sanity_methods(model_id: str) -> list[dict[str, Any]]:
    """For ``/models`` (a template global): each method with why it cannot be checked on this
    checkpoint (unsupported, over the cost limit at its defaults) and its latest result at
    default parameters here."""
    svc = _services()
    entry = svc.scanned_catalog().get(model_id)
    if not entry.ok or entry.meta is None:
        return []
    identity = ModelIdentity(entry.sha256, meta_fingerprint(entry.meta))
    methods = []
    for visualization in svc.visualizations:
        item: dict[str, Any] = {"name": visualization.name, "title": visualization.title,
                                "problem": None, "latest": None}
        try:
            method = sanity_request(visualization, {}, entry.meta)
        except ConvscopeError as error:
            item["problem"] = error.message
            methods.append(item)
            continue
        cost = sanity_cost(visualization, visualization.parse_params(method.params, entry.meta),
                           entry.meta, DEFAULT_IMAGES)
        if cost > svc.settings.max_cost:
            item["problem"] = (f"Over this server's limit at its defaults: {cost:,} model "
                               f"evaluations, CONVSCOPE_MAX_COST = {svc.settings.max_cost:,}.")
        item["latest"] = panel_sanity(svc, identity, method.name, method.params, method.version)
        methods.append(item)
    return methods


def init_app(app: Flask) -> None:
    app.jinja_env.globals["sanity_methods"] = sanity_methods
    app.register_blueprint(sanity)
    app.register_blueprint(sanity_api)


@sanity.post("/sanity")
def submit_check() -> Response | tuple[str, int]:
    from app.views.samples import sample_table

    svc = _services()
    try:
        spec = parse_sanity_request({"model": request.form.get("model") or "latest",
                                     "method": request.form.get("method", "")},
                                    svc, sample_table())
        job = svc.executor.submit(spec)
    except ConvscopeError as error:
        return render_models(error, error.http_status)
    return redirect(url_for("sanity.check", job_id=job.id), code=303)


def _render_check(view: dict[str, Any]) -> str:
    steps = view.get("steps") if view["status"] == "done" else None
    return render_template("pages/sanity.html", check=view, steps=steps,
                           chart=curve(steps, view["threshold"]) if steps else None,
                           finished=view["status"] in TERMINAL)


@sanity.get("/sanity/<job_id>", endpoint="check")
def check_page(job_id: str) -> str:
    svc = _services()
    return _render_check(sanity_view(sanity_job(svc, job_id), svc))


@sanity.get("/sanity/results/<key>", endpoint="result")
def result_page(key: str) -> str:
    """A stored outcome by its key (what panels link to; it outlives the job record)."""
    svc = _services()
    stored = svc.results.get(key) if isinstance(key, str) else None
    if stored is None or stored.record.get("kind") != "sanity":
        if svc.results.expired(key):
            raise ResultExpired("This sanity check's result has expired and was removed; run "
                                "it again from the models page.")
        raise NotFound("There is no sanity check result with this key.")
    record = stored.record
    view = {**outcome_fields(record), "id": None, "status": "done", "progress": 1.0,
            "error": None, "expired": False, "url": url_for("sanity.result", key=key),
            "api_url": None, "model_runs": 0, "cache_hits": 0,
            "model": {"id": None, "file": record["checkpoint"],
                      "sha256": record.get("checkpoint_sha256", "")},
            "filenames": record.get("filenames", []), "targets": record.get("targets", []),
            "result_url": url_for("sanity.result", key=key)}
    return _render_check(view)


@sanity.post("/sanity/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    svc = _services()
    sanity_job(svc, job_id)
    svc.executor.cancel(job_id)
    return redirect(url_for("sanity.check", job_id=job_id), code=303)
