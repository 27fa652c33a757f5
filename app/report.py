"""``convscope visualize [DIR] IMAGE... --method NAME ... --out OUTDIR``: a static report.

Runs without a server: loads one checkpoint (the directory's latest, or ``--checkpoint``; no DIR
means the bundled demo), runs the requested methods on every image and writes into OUTDIR

* ``results.json`` -- ``{"model": {...}, "images": [{"file", "predictions", "visualizations":
  [{"method", "params", "elapsed_ms", "panels": [{"title", "target", "signed", "overlay",
  "heatmap", "array"}]}]}]}`` with paths relative to OUTDIR;
* the PNGs and ``.npy`` arrays those paths name;
* ``report.html`` -- one self-contained page (images inlined as data URIs, inline CSS).

Everything a user can get wrong (a method name, a ``--param``, a target, a device, an image,
the output folder) is checked before the first model evaluation and reported as ``CODE: message`` with exit status 2;
a run that fails later exits 1. ``--json`` prints the results object to stdout.
"""
from __future__ import annotations

import argparse
import base64
import errno
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from app.errors import BadParameter, ConvscopeError, ImageUnsupported, NotFound, StorageFull

if TYPE_CHECKING:
    from PIL import Image

    from model_adapters.base import LoadedModel
    from visualizations.base import Visualization

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TOP_K = 5
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


@dataclass(frozen=True)
class MethodRequest:
    """One ``--method`` with its validated, model-resolved parameters."""

    method: "Visualization"
    params: Any


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
    for number, (path, image) in enumerate(images):
        record, page = visualize_image(model, image, path, f"{number:02d}-{_slug(path.stem)}",
                                       requests, targets, out_dir)
        results["images"].append(record)
        pages.append(page)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(results, pages), encoding="utf-8")
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
    in order (E_UNKNOWN_VISUALIZATION, E_BAD_PARAMETER, E_METHOD_UNSUPPORTED) -- all before
    the first model evaluation."""
    from app.errors import MethodUnsupported
    from visualizations import visualization_registry

    requests = []
    for method in map(visualization_registry.get, raw):
        reason = method.supports(model.meta)
        if reason:
            raise MethodUnsupported(f"{method.name}: {reason}")
        try:
            params = method.resolve(method.parse_params(raw[method.name], model.meta), model.meta)
        except BadParameter as error:
            raise BadParameter(f"{method.name}: {error.message}", fields=error.fields) from None
        requests.append(MethodRequest(method, params))
    return requests


def parse_targets(targets: Sequence[str] | None, model: "LoadedModel") -> list[int | str]:
    """``predicted`` stays symbolic (it differs per image); indices and labels are checked."""
    from app.jobs import PREDICTED, target_spec

    return [target_spec(model.meta, target) for target in targets or [PREDICTED]]


# --- running and writing ------------------------------------------------------------------------

def visualize_image(model: "LoadedModel", image: "Image.Image", path: Path, slug: str,
                    requests: Sequence[MethodRequest], targets: Sequence[int | str],
                    out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every method on one image; write its files; return (results.json record, the data
    the HTML page needs)."""
    import numpy as np

    from app.rendering import OVERLAY_OPACITY, encode_png, legend_stops, render_panel

    view = model.model_view(image)
    batch = model.to_tensor([view])
    probabilities = model.predict(batch)[0]
    predictions = model.top_k(probabilities, TOP_K)
    given_probabilities = probabilities.cpu().numpy()  # one prediction serves every method
    folder = out_dir / slug
    folder.mkdir(parents=True, exist_ok=True)
    view_png = encode_png(view.convert("RGB"))
    (folder / "model-view.png").write_bytes(view_png)

    record: dict[str, Any] = {"file": str(path), "predictions": predictions,
                              "visualizations": []}
    page: dict[str, Any] = {"file": path.name, "view": _data_uri(view_png),
                            "predictions": predictions, "methods": []}
    for request in requests:
        method = request.method
        started = time.perf_counter()
        result = method.run(model, batch, targets, request.params,
                            probabilities=given_probabilities)
        log.info("%s on %s: %.0f ms", method.name, path.name,
                 (time.perf_counter() - started) * 1000)
        panels, page_panels = [], []
        for number, panel in enumerate(result.panels):
            rendered = render_panel(panel, view, OVERLAY_OPACITY)
            stem = f"{method.name}-{number}"
            files = {"overlay": f"{slug}/{stem}-overlay.png",
                     "heatmap": f"{slug}/{stem}-heatmap.png", "array": f"{slug}/{stem}.npy"}
            (out_dir / files["overlay"]).write_bytes(rendered.overlay_png)
            (out_dir / files["heatmap"]).write_bytes(rendered.heatmap_png)
            np.save(out_dir / files["array"], panel.values, allow_pickle=False)
            panels.append({"title": panel.title,
                           "target": panel.target.to_dict() if panel.target else None,
                           "signed": bool(panel.signed), **files})
            page_panels.append({
                "title": panel.title, "kind": panel.kind, "signed": bool(panel.signed),
                "target": panel.target, "overlay": _data_uri(rendered.overlay_png),
                "heatmap": _data_uri(rendered.heatmap_png),
                "low": rendered.value_range[0], "high": rendered.value_range[1],
                "legend": ", ".join(legend_stops(panel.signed))})
        record["visualizations"].append({"method": method.name, "params": result.params,
                                         "elapsed_ms": round(result.elapsed_ms, 1),
                                         "panels": panels})
        page["methods"].append({"name": method.name, "title": method.title,
                                "reference": method.reference, "params": result.params,
                                "elapsed_ms": result.elapsed_ms, "panels": page_panels})
    return record, page


def model_record(model: "LoadedModel") -> dict[str, Any]:
    meta = model.meta
    return {"file": meta.checkpoint_file, "architecture": meta.architecture,
            "num_classes": meta.num_classes, "sha256": meta.sha256}


def render_html(results: dict[str, Any], pages: list[dict[str, Any]]) -> str:
    """The self-contained report page (Jinja2 with autoescaping; images as data URIs)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.get_template("report.html")
    return template.render(model=results["model"], images=pages,
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
