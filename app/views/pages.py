"""The HTML pages: the workbench (``/``), a job (``/jobs/<id>``, its results grid, and each
view of its results at ``/jobs/<id>/views/<view>``) and the catalog (``/models``).

Pages are rendered on the server from the same dicts as their JSON twins and work without
JavaScript: the workbench form posts to ``/`` (uploads + job in one request), the job page
refreshes itself while it runs, and its results grid links to the views' own pages.
``static/js`` adds drag and drop, thumbnails, live progress, the grid's keyboard navigation,
views opened in place, and colour scales on top.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from flask import (Blueprint, Response, current_app, redirect, render_template, request,
                   url_for)
from werkzeug.datastructures import MultiDict

from app.errors import ConvscopeError, NotFound
from app.jobs.record import TERMINAL
from app.pipeline import PREDICTED, grid_cell
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
    """The grid's rows: failure cases (true label != top-1) first, then the rest in submission
    order; each keeps its submission ``index`` (the page's ids use it) and gets the picture
    under its maps (``view_url``, ``view_size``: the maps' size, which the model view has) and,
    per method, the panels its grid cell shows (``cell``)."""
    rows = []
    for index, result in enumerate(view["results"]):
        visualizations = [{**item, "cell": grid_cell(item["panels"])}
                          for item in result["visualizations"]]
        sizes = [panel["display"]["size"] for item in visualizations for panel in item["panels"]
                 if panel["display"] and panel["display"]["size"]]
        rows.append({**result, "index": index, "visualizations": visualizations,
                     "view_url": result["model_view_url"] or result["image_url"],
                     "view_size": sizes[0] if sizes else None})
    return sorted(rows, key=lambda row: not row["failure"])


def _method_columns(view: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's columns: each method's title, plus -- for a method requested more than once --
    its parameters that differ from the method's defaults (e.g. "Saliency (gradients) ·
    smoothgrad samples 16" beside plain "Saliency (gradients)")."""
    params = ([item["params"] for item in view["results"][0]["visualizations"]]
              if view["results"] else [{} for _ in view["methods"]])
    registry = _services().visualizations
    columns = []
    for number, method in enumerate(view["methods"]):
        title = method["title"]
        twins = [n for n, other in enumerate(view["methods"]) if other["name"] == method["name"]]
        if len(twins) > 1:
            try:
                defaults = {spec.name: spec.default
                            for spec in registry.get(method["name"]).param_specs()}
            except ConvscopeError:       # a method removed since the job ran
                defaults = {}
            own = {key: value for key, value in params[number].items()
                   if key in defaults and value != defaults[key]
                   and len({repr(params[n].get(key)) for n in twins}) > 1}
            if own:
                title += " · " + ", ".join(f"{key.replace('_', ' ')} {value}"
                                           for key, value in sorted(own.items()))
        columns.append({**method, "title": title})
    return columns


def _results_context(view: dict[str, Any]) -> dict[str, Any]:
    """What the results templates need (templates/partials/results.html): the rows, the
    columns, where each view lives (its own page) and the colormaps the page re-colours with."""
    from app.rendering import colormap_hex

    job_id = view["id"]
    views = url_for("pages.job_results_view", job_id=job_id, view_id="-")[:-1]
    page = url_for("pages.job", job_id=job_id)
    return {"job": view, "results": _ordered_results(view), "methods": _method_columns(view),
            "view_href": lambda view_id: views + view_id,
            "grid_href": lambda anchor: page + "#" + anchor,
            "colormaps": {"unsigned": colormap_hex(False), "signed": colormap_hex(True)}}


@pages.get("/jobs/<job_id>")
def job(job_id: str) -> str | Response:
    svc = _services()
    found = svc.jobs.get(job_id)
    if found.kind == "evaluate":        # dataset mode has its own page for its jobs
        return redirect(url_for("evaluations.evaluation", job_id=job_id), code=303)
    if found.kind == "timeline":
        return redirect(url_for("timelines.timeline", job_id=job_id), code=303)
    if found.kind == "sanity":
        return redirect(url_for("sanity.check", job_id=job_id), code=303)
    view = job_view(found, svc)
    return render_template("pages/job.html", finished=view["status"] in TERMINAL,
                           **_results_context(view))


_NUMBER = r"(0|[1-9][0-9]{0,5})"
_VIEW_ID = re.compile(rf"detail-{_NUMBER}-{_NUMBER}|compare-image-{_NUMBER}|"
                      rf"compare-method-{_NUMBER}")


def _view_title(view_id: str, context: dict[str, Any]) -> str | None:
    """The view's title, or None when ``view_id`` names no view of this job."""
    match = _VIEW_ID.fullmatch(view_id)
    if match is None:
        return None
    image, method, compared_image, compared_method = (
        int(group) if group is not None else None for group in match.groups())
    images, methods = context["job"]["results"], context["methods"]
    if image is not None and image < len(images) and method < len(methods):
        return f"{methods[method]['title']} · {images[image]['filename']}"
    if compared_image is not None and compared_image < len(images):
        return f"{images[compared_image]['filename']}: every method"
    if compared_method is not None and compared_method < len(methods):
        return f"{methods[compared_method]['title']}: every image"
    return None


@pages.get("/jobs/<job_id>/views/<view_id>")
def job_results_view(job_id: str, view_id: str) -> str | Response:
    """One view of a finished job's results -- a cell's detail, or a comparison of an image's
    methods or of a method across the images -- as a page (the grid's links without
    JavaScript) or, with ``?fragment=1``, as the section the job page's script opens in place."""
    svc = _services()
    found = svc.jobs.get(job_id)
    if found.kind != "visualize":
        raise NotFound("This job has no such view.", fields={"view": view_id[:80]})
    view = job_view(found, svc)
    if view["status"] not in TERMINAL:
        return redirect(url_for("pages.job", job_id=job_id), code=303)
    context = _results_context(view)
    title = _view_title(view_id, context)
    if title is None:
        raise NotFound("This job has no such view.", fields={"view": view_id[:80]})
    template = ("partials/view_fragment.html" if request.args.get("fragment")
                else "pages/job_view.html")
    return render_template(template, view_id=view_id, view_title=title, **context)


@pages.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    _services().executor.cancel(job_id)
    return redirect(url_for("pages.job", job_id=job_id), code=303)


@pages.get("/models")
def models() -> tuple[str, int]:
    from app.views.sanity import render_models

    return render_models()


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
