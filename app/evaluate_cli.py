"""``convscope evaluate [DIR] DATASET --out OUTDIR``: a model on a labelled folder, as files.

Runs without a server: loads one checkpoint (the directory's latest, or ``--checkpoint``; no DIR
means the bundled demo), evaluates every image of DATASET through ``app.evaluation`` -- the
engine the server's evaluation jobs use -- and writes into OUTDIR

* ``evaluation.json`` -- model, dataset, accuracy, top-5 accuracy, per-class precision and
  recall, the confusion matrix, every image's true and predicted class with probabilities, the
  failures (most confident first), skipped files with their codes, and calibration (ECE and a
  15-bin reliability diagram);
* ``report.html`` -- one self-contained page (inline CSS and SVG, thumbnails as data URIs, no
  script): the numbers, the matrix whose cells jump to their images, the failures, the least
  certain correct images and the per-class table;
* with ``--explain N``, ``explained/``: the ``convscope visualize`` report of the N most
  confident failures, with panels for their predicted and their true class, linked from
  ``report.html``.

Exit status 0 whenever the evaluation ran, whatever the accuracy; 2 with ``CODE: message`` for
what a user got wrong (a missing dataset, labels that match no class, a bad option); 1 when a
run fails later. ``--json`` also prints ``evaluation.json`` to stdout.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from app.datasets import match_labels, read_dataset_file, scan_dataset
from app.errors import BadParameter, ConvscopeError
from app.evaluation import Evaluation, evaluation_document, summary_of
from app.evaluation_display import (cell_members, matrix_view, reliability_diagram,
                                    sorted_classes)
from app.evaluation_metrics import ImageRecords, image_record
from app.ingest import DEFAULT_MAX_BYTES, decode_image
from app.pipeline import PREDICTED, ModelIdentity

if TYPE_CHECKING:
    from model_adapters.base import LoadedModel

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ROOT = Path(__file__).resolve().parent.parent
SHOWN_FAILURES = 48
SHOWN_LEAST_CERTAIN = 24
CELL_SECTIONS = 20              # the report lists the images of the largest off-diagonal cells
CELL_IMAGES = 12
THUMBNAIL_PX = 128
PROGRESS_EVERY_S = 5.0


def evaluate_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point used by ``app.cli``; returns the process exit status."""
    out = out or sys.stdout
    try:
        document = build_evaluation(args)
    except OSError as error:
        return _fail(out, args.json, BadParameter(
            f"The report could not be written to --out ({error.strerror or 'error'}).",
            fields={"out": "a writable folder"}), EXIT_FAILED)
    except ConvscopeError as error:
        return _fail(out, args.json, error, EXIT_USAGE if _is_usage(error) else EXIT_FAILED)
    if args.json:
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        out.write(f"Wrote {Path(args.out) / 'report.html'} and evaluation.json: accuracy "
                  f"{document['accuracy']:.4f} on {document['dataset']['images']} images "
                  f"({len(document['failures'])} failures, {len(document['skipped'])} "
                  "skipped).\n")
    return EXIT_OK


def max_dataset_images() -> int:
    raw = os.environ.get("CONVSCOPE_MAX_DATASET_IMAGES", "").strip()
    if not raw:
        return 100_000
    if not raw.isdigit() or int(raw) < 1:
        raise BadParameter("CONVSCOPE_MAX_DATASET_IMAGES must be a positive integer.",
                           fields={"CONVSCOPE_MAX_DATASET_IMAGES": "a positive integer"})
    return int(raw)


def build_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Validate, evaluate, write; return the evaluation.json object."""
    from app.devices import configure_threads, resolve_device
    from app.report import open_model, parse_method_requests, parse_param_options, prepare_out_dir
    from visualizations import visualization_registry

    if len(args.paths) > 2:
        raise BadParameter("Give at most a checkpoint directory and a dataset folder.",
                           fields={"DATASET": "one folder"})
    directory = Path(args.paths[0]) if len(args.paths) == 2 else None
    dataset_path = Path(args.paths[-1])
    if args.top_k < 1 or args.explain < 0:
        raise BadParameter("--top-k must be at least 1 and --explain at least 0.",
                           fields={"top_k": "at least 1", "explain": "at least 0"})
    methods = args.methods or (["grad_cam"] if args.explain else [])
    for name in methods:
        visualization_registry.get(name)
    raw_params = parse_param_options(args.params, methods)
    scan = scan_dataset(dataset_path, max_images=max_dataset_images())
    configure_threads()
    device = resolve_device(args.device)
    out_dir = prepare_out_dir(Path(args.out))
    model = open_model(directory, args.checkpoint, device, args.trust_code)
    labelled = match_labels(scan, model.meta)           # E_DATASET_LABELS before any model pass
    requests = parse_method_requests(raw_params, model) if args.explain else []

    top_k = min(args.top_k, model.meta.num_classes)
    evaluation = Evaluation(lambda: model, ModelIdentity.of(model.meta), labelled,
                            num_classes=model.meta.num_classes, top_k=top_k)
    _run_with_progress(evaluation)
    records = evaluation.records
    assert records is not None
    summary = summary_of(evaluation, model.meta)
    summary["dataset"]["path"] = str(dataset_path)
    document = evaluation_document(summary, records, model.meta.class_names, top_k)
    if args.explain and summary["failures"]:
        document["explained"] = explain_failures(model, scan.root, records, summary,
                                                 requests, args.explain, out_dir)
    (out_dir / "evaluation.json").write_text(json.dumps(document, indent=2) + "\n",
                                             encoding="utf-8")
    (out_dir / "report.html").write_text(
        render_report(document, summary, records, model.meta.class_names, scan.root),
        encoding="utf-8")
    return document


def _run_with_progress(evaluation: Evaluation) -> None:
    started = last = time.monotonic()
    for _ in evaluation.steps():
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            rate = evaluation.computed / max(now - started, 1e-9)
            log.info("evaluated %d of %d files (%.1f images/s)", evaluation.done,
                     evaluation.total, rate)


def explain_failures(model: "LoadedModel", root: Path, records: ImageRecords,
                     summary: dict[str, Any], requests: Sequence[Any], count: int,
                     out_dir: Path) -> dict[str, Any]:
    """The ``convscope visualize`` report of the ``count`` most confident failures, in
    ``OUTDIR/explained/``, each with panels for its predicted and its true class."""
    from app.report import model_record, render_html, visualize_image

    target_dir = out_dir / "explained"
    target_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": model_record(model), "images": []}
    pages = []
    explained = []
    for rank, number in enumerate(summary["failures"][:count]):
        path = records.paths[number]
        image, _ = decode_image(read_dataset_file(root, path, DEFAULT_MAX_BYTES))
        targets = [PREDICTED, int(records.targets[number])]
        record, page = visualize_image(model, image, Path(path), f"{rank:02d}-{_slug(path)}",
                                       requests, targets, target_dir)
        record["file"] = path
        page["file"] = path
        results["images"].append(record)
        pages.append(page)
        explained.append({"file": path, "visualizations": record["visualizations"]})
    (target_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n",
                                             encoding="utf-8")
    (target_dir / "report.html").write_text(render_html(results, pages), encoding="utf-8")
    return {"report": "explained/report.html", "results": "explained/results.json",
            "images": explained}


def _slug(path: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).stem).strip("-")[:40] or "image"


# --- report.html ----------------------------------------------------------------------------------

def _thumbnail(root: Path, path: str) -> str:
    """A small JPEG of a dataset file as a data URI ("" when it cannot be read any more)."""
    try:
        image, _ = decode_image(read_dataset_file(root, path, DEFAULT_MAX_BYTES),
                                max_side=2 * THUMBNAIL_PX)
    except ConvscopeError:
        return ""
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_report(document: dict[str, Any], summary: dict[str, Any], records: ImageRecords,
                  class_names: Sequence[str], root: Path) -> str:
    import jinja2

    top_k = int(summary["top_k"])

    def images(numbers: Sequence[int]) -> list[dict[str, Any]]:
        shown = []
        for number in numbers:
            entry = image_record(records, int(number), class_names, top_k)
            entry["thumbnail_url"] = _thumbnail(root, entry["file"])
            shown.append(entry)
        return shown

    matrix = matrix_view(summary, class_names, lambda row, column: None)
    cells = sorted((cell for row in matrix["rows"] for cell in row["cells"]
                    if cell["count"] and not cell["diagonal"]),
                   key=lambda cell: -cell["count"])[:CELL_SECTIONS]
    sections = []
    for cell in cells:
        cell["url"] = f"#cell-{cell['row']}-{cell['column']}"
        members = cell_members(records, summary, (cell["row"], cell["column"]))
        sections.append({"anchor": cell["url"][1:], "true": class_names[cell["row"]],
                         "predicted": (class_names[cell["column"]]
                                       if cell["column"] != "other" else "another class"),
                         "count": cell["count"], "images": images(members[:CELL_IMAGES])})
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROOT / "templates")),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.get_template("evaluation/report.html")
    return template.render(
        evaluation=document, matrix=matrix, cells=sections,
        classes=sorted_classes(summary["classes"]),
        diagram=reliability_diagram(summary["calibration"]),
        failures=images(summary["failures"][:SHOWN_FAILURES]),
        least_certain=images(summary["least_certain_correct"][:SHOWN_LEAST_CERTAIN]),
        explained=document.get("explained"),
        stylesheet=(ROOT / "static" / "css" / "evaluation.css").read_text(encoding="utf-8"),
        created=time.strftime("%Y-%m-%d %H:%M"))


# --- errors -------------------------------------------------------------------------------------

_USAGE_CODES = {"E_BAD_PARAMETER", "E_BAD_REQUEST", "E_UNKNOWN_VISUALIZATION", "E_UNKNOWN_CLASS",
                "E_UNKNOWN_MODEL", "E_NOT_FOUND", "E_METHOD_UNSUPPORTED", "E_DEVICE_UNAVAILABLE",
                "E_CHECKPOINT_NEEDS_TRUST"}


def _is_usage(error: ConvscopeError) -> bool:
    return error.code in _USAGE_CODES or error.code.startswith("E_DATASET_")


def _fail(out: TextIO, as_json: bool, error: ConvscopeError, status: int) -> int:
    if as_json:
        json.dump({"error": error.to_dict()}, out)
        out.write("\n")
    sys.stderr.write(f"convscope evaluate: {error.code}: {error.message}\n")
    return status
