"""The dicts dataset mode's pages and JSON render: the datasets listing, an evaluation (its job
state plus, when done, every field of ``evaluation.json``) and the evaluation page's sections.

The page renders the API's dict without its per-image list (100,000 entries are for API
clients, not for a page); the sections it shows instead -- the matrix, a cell's images, the
failures, the least certain correct -- are picked from the same stored records.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from flask import url_for

from app.dataset_catalog import DatasetCatalog
from app.evaluation_display import (cell_members, matrix_view, parse_cell, reliability_diagram,
                                    sorted_classes)
from app.evaluation_metrics import (CONFIDENTLY_WRONG, confidently_wrong,
                                    confidently_wrong_record, image_record)
from app.evaluation_store import EvaluationOutcome, load_outcome

if TYPE_CHECKING:
    from app.jobs.record import Job
    from app.services import Services

PAGE_SIZE = 48
LEAST_CERTAIN_SHOWN = 24
CONFIDENT_LEVELS = (0.5, 0.8, 0.9, 0.99)    # the levels the page offers as links


def dataset_listing(services: "Services", meta: Any = None) -> list[dict[str, Any]]:
    """``GET /api/v1/datasets``: each dataset's id, name, image count and classes; with a model's
    ``meta``, also why it cannot be evaluated with that model (``problem``)."""
    datasets = DatasetCatalog.from_settings(services.settings)
    return [datasets.summary(entry, meta) for entry in datasets.entries()]


def evaluation_view(job: "Job", services: "Services", *, images: bool = True) -> dict[str, Any]:
    """``GET /api/v1/evaluations/<id>``: status and progress, and when done every field of
    ``evaluation.json`` (``images=False`` leaves out the per-image list)."""
    record = job.to_record()
    spec = job.spec
    view: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "status": record["status"],
        "progress": round(record["progress"], 4), "error": record["error"],
        "url": url_for("evaluations.evaluation", job_id=job.id),
        "api_url": url_for("evaluations_api.evaluation", job_id=job.id),
        "created": record["created"], "started": record["started"],
        "finished": record["finished"], "model_runs": record["model_runs"],
        "cache_hits": record["cache_hits"], "expired": False,
        "worker": job.running_worker,
        "model": {"id": spec.model_id, "file": spec.model_file,
                  "sha256": spec.checkpoint_sha256},
        "dataset": {"id": spec.dataset_id, "name": spec.dataset_name}}
    if record["status"] != "done" or not record["outcome_key"]:
        return view
    outcome = load_outcome(services.results, record["outcome_key"])
    if outcome is None:
        view["expired"] = True
        view["error"] = {"code": "E_RESULT_EXPIRED", "message": "This evaluation's results "
                         "have expired and were removed; run it again."}
        return view
    services.results.touch(outcome.key)
    document = outcome.document() if images else _summary(outcome)
    document["model"] = {**document["model"], "id": spec.model_id}
    document["dataset"] = {**document["dataset"], "id": spec.dataset_id}
    view.update(document)
    view["thumbnail_url"] = url_for("evaluations_api.thumbnail", job_id=job.id, number=0)[:-1] \
        + "{number}"
    return view


def _summary(outcome: EvaluationOutcome) -> dict[str, Any]:
    skip = {"kind", "key", "files", "stored_at", "paths", "class_names"}
    summary = {name: value for name, value in outcome.summary.items() if name not in skip}
    summary["confidently_wrong"] = confidently_wrong_record(outcome.records)
    return summary


def confident_level(raw: Any) -> float:
    """``?confident=`` as a level in [0, 1]; anything else is the default level."""
    try:
        level = float(raw)
    except (TypeError, ValueError):
        return CONFIDENTLY_WRONG
    return level if 0.0 <= level <= 1.0 else CONFIDENTLY_WRONG


def _image(outcome: EvaluationOutcome, job_id: str, number: int) -> dict[str, Any]:
    entry = image_record(outcome.records, number, outcome.class_names,
                         int(outcome.summary["top_k"]))
    entry["thumbnail_url"] = url_for("evaluations_api.thumbnail", job_id=job_id, number=number)
    return entry


def _page_of(numbers: Any, page: int) -> tuple[list[int], dict[str, int]]:
    total = len(numbers)
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(max(1, page), pages)
    start = (page - 1) * PAGE_SIZE
    return list(numbers[start:start + PAGE_SIZE]), {"page": page, "pages": pages,
                                                    "total": total}


def evaluation_page(view: Mapping[str, Any], outcome: EvaluationOutcome,
                    args: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation page's sections, from the view and the query string (``sort``, ``order``,
    ``cell``, ``page``, ``failures_page``, ``confident`` -- the confidently-wrong level --
    and ``confident_page``)."""
    job_id = view["id"]
    names = outcome.class_names
    records = outcome.records
    summary = outcome.summary
    sort = args.get("sort", "recall")
    descending = args.get("order") == "desc"
    selected = parse_cell(args.get("cell"))

    def page_link(**changes: Any) -> str:
        query = {key: args[key] for key in ("sort", "order", "cell", "page", "failures_page",
                                            "confident", "confident_page") if args.get(key)}
        query.update({key: value for key, value in changes.items()})
        query = {key: value for key, value in query.items() if value is not None}
        anchor = query.pop("_anchor", None)
        return url_for("evaluations.evaluation", job_id=job_id, _anchor=anchor, **query)

    def cell_link(row: int, column: Any) -> str:
        return page_link(cell=f"{row}:{column}", page=None, _anchor="cell-images")

    sections: dict[str, Any] = {
        "classes": sorted_classes(summary["classes"], sort, descending), "sort": sort,
        "descending": descending,
        "sort_links": {key: page_link(sort=key, order=None if key in ("recall", "precision")
                                      or (key == sort and descending) else "desc",
                                      _anchor="classes")
                       for key in ("index", "label", "support", "correct", "precision",
                                   "recall")},
        "matrix": matrix_view(summary, names, cell_link, selected),
        "diagram": reliability_diagram(summary["calibration"]),
        "cell": None}
    if selected is not None and selected[0] in summary["confusion"]["labels"]:
        numbers, paging = _page_of(cell_members(records, summary, selected),
                                   _int(args.get("page")))
        row, column = selected
        sections["cell"] = {
            "true": {"index": row, "label": names[row]},
            "predicted": ({"index": column, "label": names[column]} if column != "other"
                          and 0 <= column < len(names) else None),
            "images": [_image(outcome, job_id, number) for number in numbers],
            "previous": page_link(page=paging["page"] - 1, _anchor="cell-images")
            if paging["page"] > 1 else None,
            "next": page_link(page=paging["page"] + 1, _anchor="cell-images")
            if paging["page"] < paging["pages"] else None, **paging}
    level = confident_level(args.get("confident"))
    confident = confidently_wrong(records, level)
    numbers, paging = _page_of(confident, _int(args.get("confident_page")))
    sections["confident"] = {
        "level": level, "default_level": CONFIDENTLY_WRONG,
        "images": [_image(outcome, job_id, number) for number in numbers],
        "levels": [{"value": value, "current": value == level,
                    "url": page_link(confident=None if value == CONFIDENTLY_WRONG else value,
                                     confident_page=None, _anchor="confidently-wrong")}
                   for value in sorted({*CONFIDENT_LEVELS, level})],
        "previous": page_link(confident_page=paging["page"] - 1, _anchor="confidently-wrong")
        if paging["page"] > 1 else None,
        "next": page_link(confident_page=paging["page"] + 1, _anchor="confidently-wrong")
        if paging["page"] < paging["pages"] else None, **paging}
    numbers, paging = _page_of(summary["failures"], _int(args.get("failures_page")))
    sections["failures"] = {
        "images": [_image(outcome, job_id, number) for number in numbers],
        "previous": page_link(failures_page=paging["page"] - 1, _anchor="failures")
        if paging["page"] > 1 else None,
        "next": page_link(failures_page=paging["page"] + 1, _anchor="failures")
        if paging["page"] < paging["pages"] else None, **paging}
    sections["least_certain"] = [_image(outcome, job_id, number) for number
                                 in summary["least_certain_correct"][:LEAST_CERTAIN_SHOWN]]
    return sections


def _int(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 1
