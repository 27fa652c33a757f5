"""Plain dicts describing models and jobs, shared by the JSON API and the HTML pages.

A page renders exactly what its JSON twin returns, so the two cannot drift apart.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from flask import url_for

from app.errors import ResultExpired
from app.faithfulness_scores import panel_verdict
from app.pipeline import mark_panel_roles
from app.rendering import scale_description
from app.views.sanity_links import panel_sanity

if TYPE_CHECKING:
    from app.jobs.record import Job
    from app.services import Services


def model_summary(entry: Any) -> dict[str, Any]:
    """The API's model record (``GET /api/v1/models``)."""
    return entry.to_dict()


def model_detail(entry: Any) -> dict[str, Any]:
    """Everything the catalog knows about one checkpoint (``/models`` and its JSON twin)."""
    record = model_summary(entry)
    record.update(size=entry.size, sha256=entry.sha256)
    meta = entry.meta
    if meta is not None:
        record.update(
            channels=meta.channels, mean=list(meta.mean),
            std=list(meta.std), resize=meta.resize, cam_layers=list(meta.cam_layers),
            default_cam_layer=meta.default_cam_layer,
            cam_unsupported_reason=meta.cam_unsupported_reason, parameters=meta.parameters,
            adapter=meta.adapter)
    return record


def _panel(key: str, panel: dict[str, Any]) -> dict[str, Any]:
    """A stored panel record (``app.pipeline.panel_record``) with its files as URLs."""
    # One URL built, the others by name: url_for per file was a third of a big job's page.
    folder = url_for("api.result_file", key=key, name="result.json")[:-len("result.json")]

    def file_url(name: str) -> str:
        return folder + quote(name)

    return {"title": panel["title"], "kind": panel["kind"], "target": panel["target"],
            "signed": panel["signed"], "overlay_url": file_url(panel["overlay"]),
            "heatmap_url": file_url(panel["heatmap"]), "array_url": file_url(panel["array"]),
            "json_url": file_url("result.json"), "value_range": panel["value_range"],
            "display": (panel["display"] if "display" in panel
                        else _display_before_scaling(panel)),
            "metrics": panel["metrics"], "notes": panel["notes"],
            # None where unscored (and on records stored before scoring existed).
            "faithfulness": panel.get("faithfulness"),
            "faithfulness_verdict": panel_verdict(panel)}


def _display_before_scaling(panel: dict[str, Any]) -> dict[str, Any] | None:
    """The ``display`` of a panel stored before display scaling existed (a job record may still
    name one): its pictures span the full range."""
    if panel["kind"] != "heatmap":
        return None
    value_range = (float(panel["value_range"][0]), float(panel["value_range"][1]))
    return {"scale": "full", "clip_percentile": None, "range": list(value_range),
            "description": scale_description("full", bool(panel["signed"]), None, value_range),
            "ranges": {"100": list(value_range)}, "smoothing_sigma_px": None, "size": None}


def _expired() -> dict[str, Any]:
    return ResultExpired("This result has expired and was removed; run the job again.").to_dict()


def job_view(job: "Job", services: "Services") -> dict[str, Any]:
    """``GET /api/v1/jobs/<id>``: status, progress, and the results known so far."""
    record = job.to_record()
    spec = job.spec
    registry = services.visualizations
    items = record["items"]
    per_method = len(spec.methods)
    results = []
    expired = False
    sanity = _sanity_links(services, spec)
    for image_index, image_id in enumerate(spec.images):
        outcome = record["images"].get(str(image_index))
        # Only its key is shown: a lookup, not a read of result.json on every poll.
        prediction_key = outcome["prediction_key"] if outcome else None
        has_view = prediction_key is not None and services.results.exists(prediction_key)
        visualizations = []
        for method_index, method in enumerate(spec.methods):
            item = items[image_index * per_method + method_index]
            entry: dict[str, Any] = {
                "name": method.name, "title": _title(registry, method.name),
                "params": dict(method.params), "elapsed_ms": round(item["elapsed_ms"], 1),
                "status": item["status"], "progress": item["progress"], "error": item["error"],
                "cached": item["cached"], "panels": []}
            for key in item["result_keys"]:
                stored = services.results.get(key)
                if stored is None:
                    entry["error"] = entry["error"] or _expired()
                    expired = True
                    continue
                entry["params"] = dict(stored.record.get("params", entry["params"]))
                entry["panels"].extend(_panel(key, panel) for panel in stored.record["panels"])
            for panel in entry["panels"]:
                panel["sanity"] = sanity[method_index]
            mark_panel_roles(entry["panels"], outcome["predicted"] if outcome else None,
                             outcome["true_label"]["index"]
                             if outcome and outcome["true_label"] else None)
            visualizations.append(entry)
        results.append({
            "image": image_id, "filename": spec.filenames[image_index],
            "image_url": url_for("api.image", image_id=image_id),
            "model_view_url": url_for("api.result_file", key=prediction_key,
                                      name="model_view.png") if has_view else None,
            "true_label": outcome["true_label"] if outcome else None,
            "failure": bool(outcome and outcome["failure"]),
            "predictions": outcome["predictions"] if outcome else [],
            "uncertainty": outcome.get("uncertainty") if outcome else None,
            "visualizations": visualizations})
    return {"id": job.id, "status": record["status"], "progress": round(record["progress"], 4),
            "error": record["error"], "expired": expired, "url": url_for("pages.job", job_id=job.id),
            "api_url": url_for("api.job", job_id=job.id),
            "created": record["created"], "started": record["started"],
            "finished": record["finished"],
            "model": {"id": spec.model_id, "file": spec.model_file,
                      "sha256": spec.checkpoint_sha256},
            "methods": [{"name": m.name, "title": _title(registry, m.name)} for m in spec.methods],
            "targets": list(spec.targets), "model_runs": record["model_runs"],
            "cache_hits": record["cache_hits"], "worker": job.running_worker,
            "results": results}


def _sanity_links(services: "Services", spec: Any) -> list[dict[str, Any] | None]:
    """Per method of the job: ``{"passed", "spearman", "url"}`` of the latest sanity check of
    that method with those parameters on the job's checkpoint (None: never checked)."""
    return [panel_sanity(services, spec.model, method.name, method.params, method.version)
            for method in spec.methods]


def _title(registry: Any, name: str) -> str:
    try:
        return registry.get(name).title
    except Exception:  # noqa: BLE001 -- a method removed since the job ran keeps its name
        return name
