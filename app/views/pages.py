"""The HTML pages: the workbench (``/``), a job (``/jobs/<id>``) and the catalog (``/models``).

Pages are rendered on the server from the same dicts as their JSON twins and work without
JavaScript: the workbench form posts to ``/`` (uploads + job in one request) and the job page
refreshes itself. ``static/js`` adds drag and drop, thumbnails, live progress and the opacity
sliders on top.
"""
from __future__ import annotations

from typing import Any, Mapping

from flask import (Blueprint, Response, current_app, redirect, render_template, request,
                   url_for)
from werkzeug.datastructures import MultiDict

from app.errors import ConvscopeError
from app.jobs.record import TERMINAL
from app.pipeline import PREDICTED
from app.services import services
from app.views.job_requests import parse_job_request
from app.views.presenters import job_view, model_detail
from app.views.uploads import UPLOAD_FIELD, store_uploads

pages = Blueprint("pages", __name__)


def _services():
    return services(current_app)


def _selected_entry(entries: list[Any], wanted: str | None) -> Any:
    """The model the workbench shows: the one asked for, else the newest that loads."""
    if wanted:
        return _services().scanned_catalog().get(wanted)
    return next((entry for entry in entries if entry.ok), entries[0] if entries else None)


def _method_forms(entry: Any) -> list[dict[str, Any]]:
    meta = entry.meta if entry is not None and entry.ok else None
    forms = []
    for visualization in _services().visualizations:
        record = visualization.describe(meta)
        record["unsupported_reason"] = visualization.supports(meta) if meta else None
        forms.append(record)
    return forms


def _render_workbench(error: ConvscopeError | None = None, status: int = 200,
                      form: Mapping[str, Any] | None = None) -> tuple[str, int]:
    svc = _services()
    entries = svc.scanned_catalog().entries()
    wanted = (form or {}).get("model") or request.args.get("model")
    entry = _selected_entry(entries, wanted)
    settings = svc.settings
    html = render_template(
        "pages/workbench.html", entries=entries, selected=entry,
        selected_detail=model_detail(entry) if entry is not None else None,
        methods=_method_forms(entry), error=error, form=form or MultiDict(),
        class_names=entry.meta.class_names if entry is not None and entry.meta else (),
        limits={"files": settings.max_files_per_request, "images": settings.max_images_per_job,
                "request_mb": settings.max_request_mb, "max_cost": settings.max_cost})
    return html, status


@pages.get("/")
def workbench() -> tuple[str, int]:
    return _render_workbench()


def job_payload_from_form(form: MultiDict, images: list[Any]) -> dict[str, Any]:
    """The JSON job request that the workbench form describes (same shape as the API's).

    Parameters are fields ``param.<method>.<name>``; an empty field means "default". Checkboxes
    for booleans follow a hidden ``false`` field, so the last value wins.
    """
    methods = []
    for name in form.getlist("method"):
        prefix = f"param.{name}."
        params = {}
        for key in form:
            if key.startswith(prefix):
                value = form.getlist(key)[-1]
                if value != "":
                    params[key[len(prefix):]] = value
        methods.append({"name": name, "params": params})
    targets: list[Any] = [PREDICTED]
    if form.get("target_mode") == "class" and form.get("target_class", "").strip():
        targets = [form["target_class"].strip()]
    true_label = form.get("true_label", "").strip()
    image_ids = [image.id for image in images]
    return {"model": form.get("model") or "latest", "images": image_ids,
            "filenames": {image.id: image.filename for image in images},
            "visualizations": methods, "targets": targets,
            "true_labels": {image_id: true_label for image_id in image_ids} if true_label else {}}


@pages.post("/")
def submit_workbench() -> Response | tuple[str, int]:
    """The no-JavaScript path: upload the chosen files and start the job in one request."""
    svc = _services()
    try:
        records = store_uploads(request.files.getlist(UPLOAD_FIELD), svc.images,
                                max_files=svc.settings.max_files_per_request)
        payload = job_payload_from_form(request.form, records)
        spec = parse_job_request(payload, catalog=svc.scanned_catalog(), images=svc.images,
                                 settings=svc.settings, visualizations=svc.visualizations)
        job = svc.executor.submit(spec)
    except ConvscopeError as error:
        return _render_workbench(error, error.http_status, request.form)
    return redirect(url_for("pages.job", job_id=job.id), code=303)


def _ordered_results(view: dict[str, Any]) -> list[dict[str, Any]]:
    """Failure cases (true label != top-1) first, then the rest in submission order."""
    return sorted(view["results"], key=lambda result: not result["failure"])


@pages.get("/jobs/<job_id>")
def job(job_id: str) -> str | Response:
    svc = _services()
    found = svc.jobs.get(job_id)
    if found.kind == "evaluate":        # dataset mode has its own page for its jobs
        return redirect(url_for("evaluations.evaluation", job_id=job_id), code=303)
    view = job_view(found, svc)
    return render_template("pages/job.html", job=view, results=_ordered_results(view),
                           finished=view["status"] in TERMINAL)


@pages.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    _services().executor.cancel(job_id)
    return redirect(url_for("pages.job", job_id=job_id), code=303)


@pages.get("/models")
def models() -> str:
    entries = _services().scanned_catalog().entries()
    return render_template("pages/models.html", models=[model_detail(e) for e in entries])


@pages.get("/legend.css")
def legend_css() -> Response:
    """Colour-legend gradients from the renderer's own colormaps (a stylesheet, because the
    Content-Security-Policy forbids inline styles)."""
    from app.rendering import legend_stops

    rules = []
    for signed, name in ((False, "unsigned"), (True, "signed")):
        stops = ", ".join(legend_stops(signed))
        rules.append(f".legend-bar.{name} {{ background: linear-gradient(to right, {stops}); }}")
    response = Response("\n".join(rules) + "\n", mimetype="text/css")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
