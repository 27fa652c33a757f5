"""``convscope visualize [DIR] IMAGE... --method NAME ... --out OUTDIR``: a static report.

Runs without a server: loads one checkpoint (the directory's latest, or ``--checkpoint``; no DIR
means the bundled demo), runs the requested methods on every image and writes into OUTDIR

* ``results.json`` -- ``{"model": {...}, "images": [{"file", "predictions", "visualizations":
  [{"method", "params", "elapsed_ms", "panels": [<panel record>]}]}]}``, where a panel record is
  the one the server stores (``app.pipeline.panel_record``: title, kind, signed, target,
  value_range, display, metrics, notes, faithfulness, overlay, heatmap, array), with paths
  relative to OUTDIR; ``faithfulness`` holds the deletion/insertion scores
  (``app.faithfulness_scores``; None for image panels, and on all panels with
  ``--no-faithfulness``);
* the PNGs and ``.npy`` arrays those paths name;
* ``report.html`` -- one self-contained page (images inlined as data URIs, the job page's
  stylesheet inline, no script) with the job page's results grid, detail and compare views
  (``templates/partials/results.html``, ``panel.html``), each map at its method's default
  colour scale; the views open through #fragment links (CSS ``:target``).

Every image goes through ``app.pipeline`` exactly as a job's does, so the same image, checkpoint,
method, parameters and target give byte-identical arrays here and on the server.

Everything a user can get wrong (a method name, a ``--param``, a target, a device, an image,
the output folder) is checked before the first model evaluation and reported as ``CODE: message`` with exit status 2;
a run that fails later exits 1. ``--json`` prints the results object to stdout.
"""
from __future__ import annotations

import argparse
import base64
import errno
import io
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from app.errors import BadParameter, ConvscopeError, ImageUnsupported, NotFound, StorageFull
from app.faithfulness_scores import FaithfulnessScorer
from app.faithfulness_scores import panel_verdict
from app.pipeline import (PREDICTED, MethodRequest, grid_cell, image_targets, mark_panel_roles,
                          method_request, predict, target_spec, visualize, write_panel_set)

if TYPE_CHECKING:
    from PIL import Image

    from model_adapters.base import LoadedModel

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TOP_K = 5
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
STYLESHEET = TEMPLATE_DIR.parent / "static" / "css" / "convscope.css"


# --- the command ------------------------------------------------------------------------------

def visualize_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point used by ``app.cli``; returns the process exit status."""
    out = out or sys.stdout
    try:
        report = build_report(args)
    except OSError as error:  # writing OUTDIR failed part-way (disk full, removed, ...)
        return _fail(out, bool(args.json), _write_error(error), EXIT_FAILED)
    except ConvscopeError as error:
        return _fail(out, bool(args.json), error, EXIT_USAGE if _is_usage(error) else EXIT_FAILED)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write(f"Wrote {Path(args.out) / 'report.html'} and results.json "
                  f"({len(report['images'])} images).\n")
    return EXIT_OK


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Do the work of ``visualize_command``: validate, run, write; return results.json's object."""
    from app.devices import configure_threads, resolve_device

    from visualizations import visualization_registry

    directory, image_paths = split_paths(args.paths)
    # Cheap checks first: method names and --param syntax, the device, the images.
    for name in args.methods:
        visualization_registry.get(name)
    raw_params = parse_param_options(args.params, args.methods)
    configure_threads()
    device = resolve_device(args.device)
    images = [(path, read_image(path)) for path in image_paths]
    out_dir = prepare_out_dir(Path(args.out))
    model = open_model(directory, args.checkpoint, device, args.trust_code)
    requests = parse_method_requests(raw_params, model)
    targets = parse_targets(args.targets, model)

    results: dict[str, Any] = {"model": model_record(model), "images": []}
    pages: list[dict[str, Any]] = []
    pictures = Pictures()
    scorer = FaithfulnessScorer() if getattr(args, "faithfulness", True) else None
    for number, (path, image) in enumerate(images):
        record, page = visualize_image(model, image, path, f"{number:02d}-{_slug(path.stem)}",
                                       requests, targets, out_dir, pictures,
                                       faithfulness=scorer or False)
        results["images"].append(record)
        pages.append(page)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(results, pages, pictures),
                                         encoding="utf-8")
    return results


# --- inputs -----------------------------------------------------------------------------------

def split_paths(paths: Sequence[str]) -> tuple[Path | None, list[Path]]:
    """The first positional is a checkpoint DIR when it is a directory; the rest are images."""
    if not paths:
        raise BadParameter("Give at least one image.", fields={"IMAGE": "one or more files"})
    first = Path(paths[0])
    directory = first if first.is_dir() else None
    images = [Path(p) for p in (paths[1:] if directory is not None else paths)]
    if not images:
        raise BadParameter("Give at least one image after the checkpoint directory.",
                           fields={"IMAGE": "one or more files"})
    return directory, images


def read_image(path: Path) -> "Image.Image":
    """An upright RGB image, through the hardened ingest that the web upload uses."""
    from app.ingest import ingest_image

    if not path.is_file():
        raise NotFound(f"Image {path.name!r} does not exist or is not a file.",
                       fields={"IMAGE": path.name})
    try:
        data = path.read_bytes()
    except OSError:
        raise ImageUnsupported(f"Image {path.name!r} cannot be read.") from None
    try:
        return ingest_image(data, path.name).image
    except ConvscopeError as error:
        raise type(error)(f"{path.name}: {error.message}", fields=error.fields) from None


def prepare_out_dir(out_dir: Path) -> Path:
    """Create OUTDIR (and its parents) before any model work, so a bad ``--out`` is a usage
    error, not a traceback after minutes of computing."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadParameter(f"--out cannot be created as a folder ({error.strerror or 'error'}).",
                           fields={"out": "a writable folder"}) from None
    return out_dir


def open_model(directory: Path | None, checkpoint: str | None, device: Any,
               trust_code: bool) -> "LoadedModel":
    """The checkpoint to visualize: ``checkpoint`` (a file name in the directory, or an id) or
    the directory's latest; no directory means the bundled demo."""
    from app.catalog import ModelCatalog, demo_directory

    # One scan, now: a one-shot command has no training run to watch, so the listing never
    # needs a rescan (a load slower than the default rescan interval would trigger one).
    catalog = ModelCatalog(directory or demo_directory(), device, trust_code=trust_code,
                           settle_seconds=0.0, rescan_seconds=float("inf"))
    catalog.refresh()
    if checkpoint is None:
        return catalog.load(catalog.get("latest").id)
    wanted = checkpoint.strip()
    for entry in catalog.entries():
        if wanted in (entry.file, entry.id):
            return catalog.load(entry.id)
    known = ", ".join(sorted(entry.file for entry in catalog.entries())) or "none"
    raise NotFound(f"No checkpoint {wanted[:80]!r} in the directory; found: {known[:300]}.",
                   fields={"checkpoint": "a file name in the checkpoint directory"})


def parse_param_options(options: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["occlusion.window=16", ...]`` -> ``{"occlusion": {"window": "16"}}``."""
    raw: dict[str, dict[str, str]] = {name: {} for name in methods}
    for option in options:
        match = re.fullmatch(r"\s*([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\s*=(.*)", option)
        if match is None:
            raise BadParameter(f"--param {option[:80]!r} must look like NAME.KEY=VALUE, e.g. "
                               "occlusion.window=16.", fields={"param": "NAME.KEY=VALUE"})
        method, key, value = match.groups()
        if method not in raw:
            raise BadParameter(f"--param {option[:80]!r} is for method {method!r}, which is not "
                               f"requested with --method.", fields={"param": method})
        raw[method][key] = value.strip()
    return raw


def parse_method_requests(raw: dict[str, dict[str, str]],
                          model: "LoadedModel") -> list[MethodRequest]:
    """Validated methods and parameters from ``parse_param_options``' result, one per method
    in order (E_UNKNOWN_VISUALIZATION, E_BAD_PARAMETER, E_METHOD_UNSUPPORTED, each prefixed with
    the method's name) -- all before the first model evaluation."""
    from visualizations import visualization_registry

    requests = []
    for method in map(visualization_registry.get, raw):
        try:
            requests.append(method_request(method, raw[method.name], model.meta))
        except ConvscopeError as error:
            raise type(error)(f"{method.name}: {error.message}", fields=error.fields) from None
    return requests


def parse_targets(targets: Sequence[str] | None, model: "LoadedModel") -> list[int | str]:
    """``predicted`` stays symbolic (it differs per image); indices and labels are checked."""
    return [target_spec(model.meta, target) for target in targets or [PREDICTED]]


# --- running and writing ------------------------------------------------------------------------

class Pictures:
    """The pictures of a report page, each held once: the page shows a map in the grid, its
    detail and two compare views, so each place names it (``#pic-N``) and an inline SVG
    ``<use>`` shows the one copy (a data URI) -- instead of a copy of a 50-150 kB data URI in
    every place."""

    def __init__(self) -> None:
        self.uris: dict[str, str] = {}            # id -> data URI
        self.sizes: dict[str, list[int]] = {}     # id -> [width, height]
        self._ids: dict[bytes, str] = {}

    def add(self, png: bytes) -> str:
        """A reference (``#pic-N``) to the picture ``png``, added once."""
        from PIL import Image

        if png not in self._ids:
            name = f"pic-{len(self._ids)}"
            self._ids[png] = name
            self.uris[name] = _data_uri(png)
            with Image.open(io.BytesIO(png)) as picture:
                self.sizes[name] = [picture.width, picture.height]
        return "#" + self._ids[png]


def visualize_image(model: "LoadedModel", image: "Image.Image", path: Path, slug: str,
                    requests: Sequence[MethodRequest], targets: Sequence[int | str],
                    out_dir: Path, pictures: Pictures, *,
                    faithfulness: "FaithfulnessScorer | bool" = True
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every method on one image through the pipeline; write its files; return
    (results.json record, the data the HTML page needs). ``faithfulness``: score the panels
    with this scorer (shared across images: one random reference per image x target), with a
    new one (True), or not at all (False)."""
    from app.rendering import encode_png
    from visualizations import visualization_registry

    scorer = (FaithfulnessScorer() if faithfulness is True else faithfulness or None)

    prediction = predict(model, image, TOP_K)
    view_png = encode_png(prediction.view.convert("RGB"))
    (out_dir / slug).mkdir(parents=True, exist_ok=True)
    (out_dir / slug / "model-view.png").write_bytes(view_png)
    record: dict[str, Any] = {"file": str(path), "predictions": prediction.top,
                              "uncertainty": prediction.uncertainty, "visualizations": []}
    # The page's row, shaped like the job page's (templates/partials/results.html).
    page: dict[str, Any] = {"filename": path.name, "view_url": pictures.add(view_png),
                            "view_size": list(prediction.view.size),
                            "predictions": prediction.top, "true_label": None,
                            "uncertainty": prediction.uncertainty,
                            "failure": False, "visualizations": []}
    for request in requests:
        method = visualization_registry.get(request.name)
        panels: list[dict[str, Any]] = []
        page_panels: list[dict[str, Any]] = []
        elapsed_ms, params = 0.0, dict(request.params)
        for target in image_targets(model.meta, targets, prediction.predicted):
            panel_set = visualize(model, method, request, prediction, target, scorer=scorer)
            written = write_panel_set(panel_set, out_dir, f"{slug}/{method.name}-t{target}-")
            panels.extend(written)
            page_panels.extend(_page_panel(panel, panel_set.files, stored, pictures)
                               for panel, stored in zip(written, panel_set.record["panels"]))
            elapsed_ms += panel_set.record["elapsed_ms"]
            params = panel_set.record["params"]
        log.info("%s on %s: %.0f ms", method.name, path.name, elapsed_ms)
        record["visualizations"].append({"method": method.name, "params": params,
                                         "elapsed_ms": round(elapsed_ms, 1), "panels": panels})
        mark_panel_roles(page_panels, prediction.predicted, None)
        page["visualizations"].append({"name": method.name, "title": method.title,
                                       "reference": method.reference, "params": params,
                                       "elapsed_ms": elapsed_ms, "status": "done", "cached": 0,
                                       "error": None, "panels": page_panels,
                                       "cell": grid_cell(page_panels)})
    return record, page


def _page_panel(panel: dict[str, Any], files: dict[str, bytes], stored: dict[str, Any],
                pictures: Pictures) -> dict[str, Any]:
    """A written panel record with what the panel macro links to: its picture inline (the
    report is one self-contained file), downloads as paths relative to the report."""
    return {**panel, "heatmap_url": pictures.add(files[stored["heatmap"]]),
            "heatmap_file": panel["heatmap"], "overlay_url": panel["overlay"],
            "array_url": panel["array"], "json_url": "results.json",
            "faithfulness_verdict": panel_verdict(panel)}


def model_record(model: "LoadedModel") -> dict[str, Any]:
    meta = model.meta
    return {"file": meta.checkpoint_file, "architecture": meta.architecture,
            "num_classes": meta.num_classes, "sha256": meta.sha256}


def render_html(results: dict[str, Any], pages: list[dict[str, Any]], pictures: Pictures) -> str:
    """The self-contained report page (Jinja2 with autoescaping; images as data URIs; the job
    page's stylesheet inline)."""
    import jinja2

    from app.rendering import legend_stops

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.get_template("report.html")
    rows = [{**page, "index": number} for number, page in enumerate(pages)]
    methods = ([{"name": item["name"], "title": item["title"], "reference": item["reference"]}
                for item in rows[0]["visualizations"]] if rows else [])
    return template.render(model=results["model"], rows=rows, methods=methods,
                           view_href=lambda view_id: "#" + view_id,
                           grid_href=lambda anchor: "#" + anchor,
                           pictures=pictures.sizes, picture_uris=pictures.uris,
                           stylesheet=STYLESHEET.read_text(encoding="utf-8"),
                           legend={"unsigned": ", ".join(legend_stops(False)),
                                   "signed": ", ".join(legend_stops(True))},
                           created=time.strftime("%Y-%m-%d %H:%M"))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _slug(text: str) -> str:
    """A file-name-safe version of an image's stem (no separators, no dots, bounded)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40] or "image"


# --- errors ---------------------------------------------------------------------------------------

_USAGE_CODES = {"E_BAD_PARAMETER", "E_BAD_REQUEST", "E_UNKNOWN_VISUALIZATION", "E_UNKNOWN_CLASS",
                "E_UNKNOWN_MODEL", "E_NOT_FOUND", "E_METHOD_UNSUPPORTED",
                "E_DEVICE_UNAVAILABLE", "E_CHECKPOINT_NEEDS_TRUST"}


def _write_error(error: OSError) -> ConvscopeError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("The disk is full; the report could not be written.")
    return BadParameter(f"The report could not be written to --out ({error.strerror or 'error'}).",
                        fields={"out": "a writable folder"})


def _is_usage(error: ConvscopeError) -> bool:
    return error.code in _USAGE_CODES or error.code.startswith("E_IMAGE_")


def _fail(out: TextIO, as_json: bool, error: ConvscopeError, status: int) -> int:
    if as_json:
        json.dump({"error": error.to_dict()}, out)
        out.write("\n")
    sys.stderr.write(f"convscope visualize: {error.code}: {error.message}\n")
    return status
