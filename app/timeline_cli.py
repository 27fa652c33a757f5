"""``convscope timeline [DIR] IMAGE... --out OUTDIR``: the same images across a run's checkpoints.

Runs without a server. Lists DIR's checkpoints in training order (``app.checkpoint_order``;
``--every K`` keeps every K-th, the first and the last always), loads them **one at a time** --
each once, dropped before the next, so a directory of 50 resnet50 checkpoints never holds more
than one -- and runs every image through ``app.pipeline`` on each (predictions, then every
``--method`` for each target), and with ``--dataset`` the whole dataset through
``app.evaluation`` (the engine of ``convscope evaluate``). It writes into OUTDIR

* ``timeline.json``::

    {"checkpoints": [{"file", "sha256", "epoch", "step", "order_by", "ok", "error",
                      "accuracy", "recall"}],                  # training order
     "images": [{"file", "targets", "steps": [{"checkpoint", "predictions": [{"index", "label",
                 "probability"}], "visualizations": [{"method", "panels": [<panel record>]}]}]}],
     "flips": [{"from", "to", "right_to_wrong": [path], "wrong_to_right": [path]}],
     "scales": [{"image", "method", "panel", "range"}], "dataset": {...} | null}

  (a step per loadable checkpoint; panel records as in ``results.json``, paths relative to
  OUTDIR; ``accuracy`` and ``recall`` null and ``flips`` empty without ``--dataset``);
* the panel files those records name, and ``report.html``: one self-contained page (no script)
  with, per image and method, a filmstrip on one colour scale per strip, the prediction under
  each frame, the top classes' probabilities over training as inline SVG, and with a dataset the
  accuracy and per-class recall curves and the flips.

Targets: ``predicted`` (the default) is each image's predicted class **at the last loadable
checkpoint**, so every frame of a strip explains the same class; an index or a label fixes it.
A checkpoint that fails to load is listed with its error and skipped; the others still run.
Usage errors exit 2 before any model is loaded (beyond the last checkpoint, whose classes the
targets are checked against); a run that fails later exits 1.
"""
from __future__ import annotations

import argparse
import base64
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

import numpy as np

from app.checkpoint_order import every_kth
from app.errors import BadParameter, CheckpointUnreadable, ConvscopeError, NotFound
from app.pipeline import (PREDICTED, ModelIdentity, image_targets, predict, target_spec,
                          visualize, write_panel_set)
from app.timeline import (CheckpointFile, chart_classes, dataset_figures, find_flips,
                          line_chart_svg, ordered_files, render_frame, strip_range)

if TYPE_CHECKING:
    from PIL import Image

    from app.datasets import DatasetScan
    from model_adapters.base import LoadedModel

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ROOT = Path(__file__).resolve().parent.parent
TOP_K = 5


def timeline_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point used by ``app.cli``; returns the process exit status."""
    from app.report import _is_usage

    out = out or sys.stdout
    try:
        document = build_timeline(args)
    except OSError as error:
        return _fail(out, args.json, BadParameter(
            f"The report could not be written to --out ({error.strerror or 'error'}).",
            fields={"out": "a writable folder"}), EXIT_FAILED)
    except ConvscopeError as error:
        usage = _is_usage(error) or error.code.startswith(("E_DATASET_", "E_CONFIG"))
        return _fail(out, args.json, error, EXIT_USAGE if usage else EXIT_FAILED)
    if args.json:
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        loaded = sum(1 for checkpoint in document["checkpoints"] if checkpoint["ok"])
        out.write(f"Wrote {Path(args.out) / 'report.html'} and timeline.json: "
                  f"{len(document['images'])} images on {loaded} of "
                  f"{len(document['checkpoints'])} checkpoints.\n")
    return EXIT_OK


class _Inputs:
    """What the user asked for, checked before any model work."""

    def __init__(self, args: argparse.Namespace) -> None:
        from app.devices import configure_threads, resolve_device
        from app.report import parse_param_options, prepare_out_dir, read_image, split_paths
        from visualizations import visualization_registry

        if args.every < 1:
            raise BadParameter("--every must be at least 1.", fields={"every": "at least 1"})
        if args.dataset is None:
            directory, image_paths = split_paths(args.paths)
        elif len(args.paths) == 1 and Path(args.paths[0]).is_dir():
            directory, image_paths = Path(args.paths[0]), []    # a dataset alone is enough
        else:
            directory, image_paths = split_paths(args.paths)
        self.methods = list(args.methods or [])
        for name in self.methods:
            visualization_registry.get(name)
        self.raw_params = parse_param_options(args.params, self.methods)
        self.scan: "DatasetScan | None" = None
        if args.dataset is not None:
            from app.datasets import scan_dataset
            from app.evaluate_cli import max_dataset_images

            self.scan = scan_dataset(Path(args.dataset), max_images=max_dataset_images())
        configure_threads()
        self.device = resolve_device(args.device)
        self.images = [(path, read_image(path)) for path in image_paths]
        self.out_dir = prepare_out_dir(Path(args.out))
        self.targets = list(args.targets or [PREDICTED])
        self.trust_code = bool(args.trust_code)
        self.directory = directory


def build_timeline(args: argparse.Namespace) -> dict[str, Any]:
    """Validate, run every checkpoint, write; return the timeline.json object."""
    from app.catalog import demo_directory
    from model_adapters.config import read_config

    inputs = _Inputs(args)
    directory = inputs.directory or demo_directory()
    config = read_config(directory)
    config.weights_path()       # a bad `weights` fails here, as in the catalog
    files = every_kth(ordered_files(directory, config), args.every)
    if not files:
        raise NotFound("The checkpoint directory has no checkpoint files.",
                       fields={"DIR": "a folder of .pt/.pth/.ckpt/.bin/.safetensors files"})
    runner = _Runner(inputs, config, files)
    runner.run()
    document = runner.document()
    (inputs.out_dir / "timeline.json").write_text(json.dumps(document, indent=2) + "\n",
                                                  encoding="utf-8")
    (inputs.out_dir / "report.html").write_text(render_report(document, runner),
                                                encoding="utf-8")
    return document


class _Runner:
    """Loads each checkpoint once, in turn, and keeps only records (never two models)."""

    def __init__(self, inputs: _Inputs, config: Any, files: list[CheckpointFile]) -> None:
        self.inputs = inputs
        self.config = config
        self.files = files
        self.checkpoints: list[dict[str, Any]] = [
            {**item.record(), "sha256": None, "ok": False, "error": None, "accuracy": None,
             "recall": None} for item in files]
        self.steps: list[dict[int, dict[str, Any]]] = [{} for _ in inputs.images]
        self.probabilities: list[dict[int, np.ndarray]] = [{} for _ in inputs.images]
        self.views: list[bytes | None] = [None for _ in inputs.images]
        self.correct: dict[int, dict[str, bool]] = {}
        self.targets: list[list[int]] = []
        self.class_names: Sequence[str] = ()
        self.dataset: dict[str, Any] | None = None
        self.elapsed_s: list[float] = [0.0 for _ in files]
        self._anchor_predictions: dict[int, Any] = {}

    def run(self) -> None:
        # The last loadable checkpoint first: its predictions fix each image's target ("the
        # class the trained model predicts"), so every frame of a strip explains that class.
        anchor = None
        for number in reversed(range(len(self.files))):
            model = self._load(number)
            if model is not None:
                anchor = number
                self._set_targets(model)
                self._compute(number, model)
                del model
                break
        if anchor is None:
            return
        for number in range(anchor):
            if self.checkpoints[number]["error"] is not None:
                continue
            model = self._load(number)
            if model is not None:
                self._compute(number, model)
                del model
            gc.collect()

    def _load(self, number: int) -> "LoadedModel | None":
        from app.catalog import file_sha256, with_file_facts
        from model_adapters import load_checkpoint

        item, record = self.files[number], self.checkpoints[number]
        started = time.perf_counter()
        try:
            record["sha256"] = file_sha256(item.path)
            model = load_checkpoint(item.path, self.config, self.inputs.device,
                                    trust_code=self.inputs.trust_code)
        except ConvscopeError as error:
            record["error"] = {"code": error.code, "message": error.message}
            log.warning("%s: %s %s", item.file, error.code, error.message)
            return None
        except OSError:
            error = CheckpointUnreadable(f"The checkpoint {item.file!r} cannot be read.")
            record["error"] = {"code": error.code, "message": error.message}
            return None
        except Exception:  # noqa: BLE001 -- one bad file must not stop the others
            log.exception("Loading %s failed unexpectedly.", item.file)
            error = CheckpointUnreadable(f"The checkpoint {item.file!r} could not be loaded.")
            record["error"] = {"code": error.code, "message": error.message}
            return None
        model.meta = with_file_facts(model.meta, item.file, record["sha256"],
                                     item.progress.modified)
        self.elapsed_s[number] += time.perf_counter() - started
        return model

    def _set_targets(self, model: "LoadedModel") -> None:
        """Each image's class indices to explain (usage errors name the option)."""
        try:
            specs = [target_spec(model.meta, raw) for raw in self.inputs.targets]
        except ConvscopeError as error:
            raise type(error)(f"--target: {error.message}", fields=error.fields) from None
        self.class_names = model.meta.class_names
        self.targets = []
        for image_number, (_, image) in enumerate(self.inputs.images):
            prediction = predict(model, image, TOP_K, with_uncertainty=False)
            self._anchor_predictions[image_number] = prediction    # used once, by _compute
            self.targets.append(image_targets(model.meta, specs, prediction.predicted))

    def _compute(self, number: int, model: "LoadedModel") -> None:
        from app.rendering import encode_png
        from app.report import _slug, parse_method_requests
        from visualizations import visualization_registry

        started = time.perf_counter()
        item, record = self.files[number], self.checkpoints[number]
        out_dir = self.inputs.out_dir
        try:
            requests = parse_method_requests(self.inputs.raw_params, model)
        except ConvscopeError as error:
            record["error"] = {"code": error.code, "message": error.message}
            return
        record["ok"] = True
        record["architecture"] = model.meta.architecture
        folder = f"{number:03d}-{_slug(item.file)}"
        for image_number, (path, image) in enumerate(self.inputs.images):
            prediction = (self._anchor_predictions.pop(image_number, None)
                          or predict(model, image, TOP_K, with_uncertainty=False))
            if self.views[image_number] is None:
                self.views[image_number] = encode_png(prediction.view.convert("RGB"))
            self.probabilities[image_number][number] = prediction.probabilities
            step: dict[str, Any] = {"checkpoint": item.file, "predictions": prediction.top,
                                    "visualizations": []}
            slug = f"{image_number:02d}-{_slug(path.stem)}"
            for request in requests:
                method = visualization_registry.get(request.name)
                panels: list[dict[str, Any]] = []
                for target in self.targets[image_number]:
                    panel_set = visualize(model, method, request, prediction, target)
                    panels.extend(write_panel_set(panel_set, out_dir,
                                                  f"{slug}/{folder}/{method.name}-t{target}-"))
                step["visualizations"].append({"method": method.name, "panels": panels})
            self.steps[image_number][number] = step
        if self.inputs.scan is not None:
            self._evaluate(number, model)
        self.elapsed_s[number] += time.perf_counter() - started
        log.info("%s: done in %.1f s", item.file, self.elapsed_s[number])

    def _evaluate(self, number: int, model: "LoadedModel") -> None:
        from app.datasets import match_labels
        from app.evaluation import Evaluation

        assert self.inputs.scan is not None
        labelled = match_labels(self.inputs.scan, model.meta)
        evaluation = Evaluation(lambda: model, ModelIdentity.of(model.meta), labelled,
                                num_classes=model.meta.num_classes,
                                top_k=min(TOP_K, model.meta.num_classes))
        records = evaluation.run()
        figures = dataset_figures(records, model.meta.class_names, labelled.classes)
        self.checkpoints[number]["accuracy"] = figures["accuracy"]
        self.checkpoints[number]["recall"] = figures["recall"]
        self.correct[number] = figures["correct"]
        if self.dataset is None:
            self.dataset = {"name": self.inputs.scan.name, "path": str(self.inputs.scan.root),
                            "images": len(records),
                            "skipped": [entry.to_dict() for entry in evaluation.skipped],
                            "classes": [model.meta.class_names[i] for i in labelled.classes]}

    # --- the document ---------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        images = []
        scales = []
        for image_number, (path, _) in enumerate(self.inputs.images):
            steps = [self.steps[image_number][number] for number in range(len(self.files))
                     if number in self.steps[image_number]]
            images.append({"file": str(path),
                           "targets": self.targets[image_number] if self.targets else [],
                           "steps": steps})
            for method_number, method in enumerate(self.inputs.raw_params):
                for panel_number, frames in enumerate(self.strip_panels(image_number,
                                                                        method_number)):
                    shared = strip_range([frame for _, frame in frames])
                    scales.append({"image": str(path), "method": method, "panel": panel_number,
                                   "range": list(shared) if shared else None})
        flips = find_flips([(self.files[number].file, self.correct.get(number))
                            for number in range(len(self.files))])
        return {"checkpoints": self.checkpoints, "images": images,
                "flips": flips if self.inputs.scan is not None else [],
                "scales": scales, "dataset": self.dataset,
                "seconds_per_checkpoint": [round(value, 3) for value in self.elapsed_s]}

    def strip_panels(self, image_number: int, method_number: int
                     ) -> list[list[tuple[int, dict[str, Any] | None]]]:
        """Per panel position, (checkpoint number, its panel record or None) over training."""
        strips: list[list[tuple[int, dict[str, Any] | None]]] = []
        for number in range(len(self.files)):
            step = self.steps[image_number].get(number)
            panels = (step["visualizations"][method_number]["panels"]
                      if step is not None else [])
            while len(strips) < len(panels):
                strips.append([(earlier, None) for earlier in range(number)])
            for position, strip in enumerate(strips):
                strip.append((number, panels[position] if position < len(panels) else None))
        return strips


# --- report.html ----------------------------------------------------------------------------------

def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _short(file: str) -> str:
    return file.rsplit(".", 1)[0][:18]


def render_report(document: dict[str, Any], runner: _Runner) -> str:
    """The self-contained report page (Jinja2, autoescaped; pictures as data URIs)."""
    import io

    import jinja2
    from PIL import Image

    labels = [_short(checkpoint["file"]) for checkpoint in document["checkpoints"]]
    out_dir = runner.inputs.out_dir
    image_rows = []
    for image_number, entry in enumerate(document["images"]):
        view_png = runner.views[image_number]
        view = Image.open(io.BytesIO(view_png)).convert("RGB") if view_png else None
        methods = []
        for method_number, method in enumerate(runner.inputs.raw_params):
            strips = []
            for frames in runner.strip_panels(image_number, method_number):
                shared = strip_range([frame for _, frame in frames])
                cells = []
                for number, panel in frames:
                    cells.append(_frame_cell(runner, image_number, number, panel, shared, view,
                                             out_dir))
                title = next((panel["title"] for _, panel in frames if panel), method)
                strips.append({"title": title, "range": shared, "frames": cells})
            methods.append({"name": method, "strips": strips})
        probabilities = [runner.probabilities[image_number].get(number)
                         for number in range(len(runner.files))]
        classes = chart_classes(probabilities)
        series = [(runner.class_names[index],
                   [float(row[index]) if row is not None else None for row in probabilities])
                  for index in classes]
        image_rows.append({"file": entry["file"], "view": _data_uri(view_png) if view_png else "",
                           "targets": [runner.class_names[index] for index in entry["targets"]],
                           "methods": methods,
                           "chart": line_chart_svg(labels, series, title="Top classes' "
                                                   "probability over training")})
    accuracy_chart = recall_chart = None
    if document["dataset"] is not None:
        accuracy_chart = line_chart_svg(labels, [("accuracy", [c["accuracy"] for c in
                                                              document["checkpoints"]])],
                                        title="Dataset accuracy over training",
                                        y_label="accuracy")
        names = document["dataset"]["classes"]
        recall_chart = line_chart_svg(
            labels, [(name, [(c["recall"] or {}).get(name) for c in document["checkpoints"]])
                     for name in names], title="Per-class recall over training",
            y_label="recall")
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROOT / "templates")),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.get_template("timeline/report.html")
    return template.render(
        timeline=document, images=image_rows, accuracy_chart=accuracy_chart,
        recall_chart=recall_chart, markup=jinja2.utils.markupsafe.Markup,
        stylesheet=(ROOT / "static" / "css" / "timeline.css").read_text(encoding="utf-8"),
        created=time.strftime("%Y-%m-%d %H:%M"))


def _frame_cell(runner: _Runner, image_number: int, number: int, panel: dict[str, Any] | None,
                shared: tuple[float, float] | None, view: "Image.Image | None",
                out_dir: Path) -> dict[str, Any]:
    checkpoint = runner.checkpoints[number]
    step = runner.steps[image_number].get(number)
    cell: dict[str, Any] = {"checkpoint": checkpoint["file"], "epoch": checkpoint["epoch"],
                            "step": checkpoint["step"], "error": checkpoint["error"],
                            "picture": None, "prediction": None, "changed": False}
    if step is not None:
        top = step["predictions"][0]
        cell["prediction"] = top
        earlier = [runner.steps[image_number][n] for n in range(number)
                   if n in runner.steps[image_number]]
        cell["changed"] = bool(earlier) and earlier[-1]["predictions"][0]["index"] != top["index"]
    if panel is not None:
        if panel["kind"] == "heatmap" and shared is not None:
            values = np.load(out_dir / panel["array"], allow_pickle=False)
            cell["picture"] = _data_uri(render_frame(values, bool(panel["signed"]), shared, view))
        else:
            cell["picture"] = _data_uri((out_dir / panel["overlay"]).read_bytes())
    return cell


def _fail(out: TextIO, as_json: bool, error: ConvscopeError, status: int) -> int:
    if as_json:
        json.dump({"error": error.to_dict()}, out)
        out.write("\n")
    sys.stderr.write(f"convscope timeline: {error.code}: {error.message}\n")
    return status


__all__ = ["build_timeline", "timeline_command"]
