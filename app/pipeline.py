"""The one path from an image to panels, shared by every caller.

``convscope visualize``, the job executor and every later kind of job (dataset evaluation,
timelines across checkpoints, sanity checks, remote workers) turn an image into predictions and
panels through these functions; a new caller composes them and never copies them:

* ``target_spec`` and ``image_targets``: "predicted", a class index or a label, to class indices
  (one resolver for all: ``visualizations.base.resolve_targets``);
* ``method_request``: a method name and raw parameters, validated and resolved for one model;
* ``predict``: the picture the model sees, its input batch, class probabilities and top-k;
* ``visualize``: one method on one image for one target, as a ``PanelSet`` -- the result record
  with one panel record per panel, and the files (arrays, PNGs) it names.

The panel record is the same everywhere (result store, job API, the CLI's ``results.json``)::

    {"title", "kind", "signed", "target", "value_range", "display", "metrics", "notes",
     "faithfulness", "overlay", "heatmap", "array"}

with file names relative to where the files are written; an image panel (``kind="image"``, e.g.
the occlusion grid) is stored once and named by both ``overlay`` and ``heatmap``, and has no
``display`` (None). ``value_range`` is the values' own range; ``display`` is the colour range
the pictures use (``app.rendering.DisplayScale.record``: the method's clip percentile, its
description for the legend, the ranges of the other clip choices, the smoothed view's sigma).
``faithfulness`` is ``{"deletion_auc", "insertion_auc", "random_deletion_auc",
"random_insertion_auc"}`` (``app.faithfulness_scores``) on every scored panel -- a heatmap with
a target, when scoring is on -- and None on the others (image panels, panels without a target,
or scoring turned off).

No HTTP, no job records and no disk here besides ``write_panel_set``: the job executor puts a
``PanelSet`` into the ``ResultStore``, the CLI into its report folder.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from app.errors import BadParameter, MethodUnsupported
from app.faithfulness_scores import FAITHFULNESS_VERSION
from app.faithfulness_scores import evaluations_per_target as faithfulness_cost
from app.rendering import (OVERLAY_OPACITY, DisplayDefaults, display_scale, encode_png,
                           render_panel)
from app.stores import canonical_json, result_key
from visualizations.base import is_predicted, resolve_targets
from visualizations.context import RunContext

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from app.faithfulness_scores import FaithfulnessScorer
    from model_adapters.base import LoadedModel, ModelMeta
    from visualizations.base import Panel, Visualization

PREDICTED = "predicted"
# Bumped when a stored prediction (its record, the model view or the probabilities) changes.
# 2: the record carries the uncertainty figures (app.uncertainty).
PREDICTION_VERSION = 2
# Bumped when a stored visualization's pictures or panel records change for the same arrays
# (2: display scaling -- clipped colour ranges and the ``display`` record).
RENDERING_VERSION = 2
PANEL_FILE_FIELDS = ("overlay", "heatmap", "array")
# ``primary`` and ``role`` are added per image by mark_panel_roles.
PANEL_FIELDS = {"title", "kind", "signed", "target", "value_range", "display", "metrics",
                "notes", "faithfulness", "primary", "role", *PANEL_FILE_FIELDS}


# --- what to compute ----------------------------------------------------------------------------

def target_spec(meta: "ModelMeta", raw: Any) -> int | str:
    """One requested target as a request keeps it: PREDICTED (it differs per image) or a checked
    class index, from an index or a label."""
    if is_predicted(raw):
        return PREDICTED
    if not isinstance(raw, (int, str)) or isinstance(raw, bool):
        raise BadParameter("A target must be \"predicted\", a class index or a class label.",
                           fields={"targets": "\"predicted\", a class index or a label"})
    return meta.class_index(raw)


def image_targets(meta: "ModelMeta", specs: Sequence[int | str], predicted: int,
                  true_index: int | None = None) -> list[int]:
    """Class indices to explain for one image: the requested ones, plus the predicted and the
    true class when they differ (a failure case), so the two can be compared side by side."""
    wanted = list(specs)
    if true_index is not None and true_index != predicted:
        wanted += [PREDICTED, true_index]
    return resolve_targets(meta, predicted, wanted)


@dataclass(frozen=True)
class MethodRequest:
    """One method with its parameters resolved for a model: concrete values (so an explicit value
    and the AUTO default that resolves to it share results), its cost per image and target, and
    the method's version (part of every result's cache key)."""

    name: str
    params: Mapping[str, Any]
    cost: int
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "cost": self.cost,
                "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodRequest":
        return cls(data["name"], dict(data["params"]), int(data["cost"]),
                   int(data.get("version", 1)))


def method_request(visualization: "Visualization", raw_params: Any,
                   meta: "ModelMeta") -> MethodRequest:
    """Check that ``visualization`` runs on this model and validate its parameters: raises
    E_METHOD_UNSUPPORTED or E_BAD_PARAMETER (naming the field) before any model evaluation."""
    reason = visualization.supports(meta)
    if reason:
        raise MethodUnsupported(reason, fields={"visualizations": visualization.name})
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, Mapping):
        raise BadParameter("\"params\" must be an object.", fields={"params": "an object"})
    params = visualization.resolve(visualization.parse_params(raw_params, meta), meta)
    resolved = json.loads(canonical_json(dataclasses.asdict(params)))
    return MethodRequest(visualization.name, resolved, int(visualization.cost(params, meta)),
                         int(visualization.version))


# --- cache keys ---------------------------------------------------------------------------------

def meta_fingerprint(meta: "ModelMeta") -> str:
    """What besides the weights changes a result: preprocessing and labels (convscope.toml)."""
    facts = {"architecture": meta.architecture, "input_size": list(meta.input_size),
             "channels": meta.channels, "mean": list(meta.mean), "std": list(meta.std),
             "resize": meta.resize, "classes": list(meta.class_names), "adapter": meta.adapter}
    return hashlib.sha256(canonical_json(facts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """Which model computed a result: the checkpoint's bytes and how its inputs are prepared."""

    checkpoint_sha256: str
    meta_fingerprint: str

    @classmethod
    def of(cls, meta: "ModelMeta") -> "ModelIdentity":
        return cls(meta.sha256, meta_fingerprint(meta))


def prediction_key(image_id: str, model: ModelIdentity, top_k: int,
                   with_uncertainty: bool = True) -> str:
    return result_key(kind="prediction", version=PREDICTION_VERSION, image=image_id,
                      checkpoint=model.checkpoint_sha256, meta=model.meta_fingerprint,
                      top_k=top_k, uncertainty=with_uncertainty)


def visualization_key(image_id: str, model: ModelIdentity, request: MethodRequest,
                      target: int, *, faithfulness: bool = False) -> str:
    """A stored visualization's key; one with faithfulness scores is another result than one
    without, so a result without scores is never served where scores are wanted."""
    return result_key(kind="visualization", image=image_id, checkpoint=model.checkpoint_sha256,
                      meta=model.meta_fingerprint, method=request.name,
                      version=request.version, rendering=RENDERING_VERSION,
                      params=request.params, target=target,
                      faithfulness=FAITHFULNESS_VERSION if faithfulness else 0)


# --- predicting ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """One image through the model once: what every method of that image starts from."""

    view: "Image.Image"                 # the picture the model sees (resized, cropped)
    batch: "torch.Tensor"               # (1, C, H, W), normalized, on the model's device
    probabilities: np.ndarray           # (num_classes,) float32
    top: list[dict[str, Any]]           # [{"index", "label", "probability"}], best first
    uncertainty: dict[str, Any] | None = None   # app.uncertainty's figures

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    def record(self) -> dict[str, Any]:
        """What a stored prediction says (its files are ``prediction_files``)."""
        return {"kind": "prediction", "predictions": self.top, "predicted": self.predicted,
                "uncertainty": self.uncertainty}

    def files(self) -> dict[str, bytes]:
        return {"model_view.png": encode_png(self.view),
                "probabilities.npy": npy_bytes(self.probabilities)}


def predict(model: "LoadedModel", image: "Image.Image", top_k: int, *,
            with_uncertainty: bool = True) -> Prediction:
    """The model's top-k for one image, and (unless told not to) how far to believe it:
    ``app.uncertainty``'s figures, a few small batches more."""
    from app.uncertainty import uncertainty

    view = model.model_view(image)
    batch = model.to_tensor([view])
    probabilities = model.predict(batch)[0].float().cpu().numpy().astype(np.float32)
    figures = uncertainty(model, batch, probabilities) if with_uncertainty else None
    return Prediction(view, batch, probabilities,
                      model.top_k(torch_from_numpy(probabilities), top_k), figures)


def torch_from_numpy(array: np.ndarray) -> "torch.Tensor":
    import torch

    return torch.from_numpy(array)


class StoredInputs:
    """A stored prediction's inputs -- the model view, the batch and the probabilities -- each
    read or built on first use: an image whose results are all stored needs none of them, and
    the batch is built once for all its methods and targets."""

    def __init__(self, file: Callable[[str], Path], model: Callable[[], "LoadedModel"]) -> None:
        self._file = file           # name in the stored prediction -> its path
        self._model = model         # loads the model on first need

    @functools.cached_property
    def view(self) -> "Image.Image":
        from PIL import Image

        with Image.open(self._file("model_view.png")) as image:
            return image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        return np.load(self._file("probabilities.npy"), allow_pickle=False)

    @functools.cached_property
    def batch(self) -> "torch.Tensor":
        return self._model().to_tensor([self.view])


# --- visualizing --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PanelSet:
    """One method on one image for one target: the result record and the files it names."""

    record: dict[str, Any]
    files: dict[str, bytes]


def visualize(model: "LoadedModel", visualization: "Visualization", request: MethodRequest,
              inputs: Any, target: int, context: RunContext | None = None, *,
              scorer: "FaithfulnessScorer | None" = None) -> PanelSet:
    """Run ``visualization`` with ``request``'s parameters on one image (``inputs``: a
    ``Prediction`` or ``StoredInputs``) for class ``target``, and render its panels; with a
    ``scorer``, score each panel's faithfulness too (its random references shared with every
    other call given the same scorer)."""
    context = context or RunContext()
    params = visualization.parse_params(request.params, model.meta)
    # With scoring, the method's progress is its share of the evaluations, scoring the rest.
    method_share = 1.0
    if scorer is not None:
        method_share = request.cost / (request.cost + faithfulness_cost([request], model.meta))
    result = visualization.run(model, inputs.batch, [target], params,
                               _progress_share(context, 0.0, method_share),
                               probabilities=inputs.probabilities)
    scores: list[dict[str, float] | None] = [None] * len(result.panels)
    faithfulness_ms = None
    if scorer is not None:
        started = time.perf_counter()
        scores = scorer.score_panels(model, visualization.name, result.params, inputs.batch,
                                     result.panels, _progress_share(context, method_share, 1.0))
        faithfulness_ms = round((time.perf_counter() - started) * 1000.0, 3)
    files: dict[str, bytes] = {}
    defaults = DisplayDefaults.of(visualization)
    panels = [panel_record(number, panel, inputs.view, files, defaults, scores[number])
              for number, panel in enumerate(result.panels)]
    record = {"kind": "visualization", "method": visualization.name,
              "title": visualization.title, "version": request.version, "params": result.params,
              "target": target, "elapsed_ms": round(result.elapsed_ms, 3),
              "faithfulness_ms": faithfulness_ms, "panels": panels}
    return PanelSet(record, files)


def _progress_share(context: RunContext, start: float, stop: float) -> RunContext:
    """``context`` reporting its progress 0..1 as ``start``..``stop`` of the whole."""
    if context.progress is None or (start, stop) == (0.0, 1.0):
        return context
    report = context.report
    return RunContext(progress=lambda fraction: report(start + (stop - start) * fraction),
                      cancel_event=context.cancel_event, batch_size=context.batch_size)


def panel_record(number: int, panel: "Panel", view: "Image.Image", files: dict[str, bytes],
                 defaults: DisplayDefaults = DisplayDefaults(),
                 faithfulness: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Render one panel into ``files`` at its default display scale (``defaults``: the
    method's) and describe it (the one panel record shape) with its ``faithfulness`` scores
    (None: not scored). The array is stored as computed."""
    prefix = f"panel-{number}"
    scale = display_scale(panel, defaults) if panel.kind == "heatmap" else None
    rendered = render_panel(panel, view, OVERLAY_OPACITY,
                            scale.value_range if scale is not None else None)
    files[f"{prefix}-values.npy"] = npy_bytes(np.asarray(panel.values))
    if panel.kind == "heatmap":
        overlay, heatmap = f"{prefix}-overlay.png", f"{prefix}-heatmap.png"
        files[overlay], files[heatmap] = rendered.overlay_png, rendered.heatmap_png
    else:
        # An image panel comes back as it is, in both slots: stored once.
        overlay = heatmap = f"{prefix}-image.png"
        files[overlay] = rendered.heatmap_png
    low, high = panel.value_range
    clash = set(panel.extra) & PANEL_FIELDS
    assert not clash, f"a panel's extra fields may not replace {sorted(clash)}"
    return {**panel.extra, "title": panel.title, "kind": panel.kind, "signed": bool(panel.signed),
            "target": panel.target.to_dict() if panel.target is not None else None,
            "value_range": [float(low), float(high)],
            "display": scale.record(panel, defaults) if scale is not None else None,
            "metrics": {name: float(value) for name, value in panel.metrics.items()},
            "notes": list(panel.notes),
            "faithfulness": dict(faithfulness) if faithfulness is not None else None,
            "overlay": overlay, "heatmap": heatmap, "array": f"{prefix}-values.npy"}


def mark_panel_roles(panels: list[dict[str, Any]], predicted: int | None,
                     true_index: int | None) -> None:
    """Add what a results grid needs to one image's panel records of one method: ``primary``
    (the first map of each target: the one a grid cell shows) and ``role`` ("predicted" or
    "true" where the target is the image's top-1 or its true class, else None)."""
    seen: set[int | None] = set()
    for panel in panels:
        index = panel["target"]["index"] if panel["target"] else None
        panel["primary"] = panel["kind"] == "heatmap" and index not in seen
        if panel["primary"]:
            seen.add(index)
        panel["role"] = ("predicted" if index is not None and index == predicted else
                         "true" if index is not None and index == true_index else None)


def grid_cell(panels: list[dict[str, Any]]) -> list[int]:
    """Which of one image's panels of one method a results grid cell shows, by position: for a
    failure case the predicted and the true class's maps side by side, else the first map."""
    primary = [number for number, panel in enumerate(panels) if panel.get("primary")]
    by_role = {role: next((n for n in primary if panels[n].get("role") == role), None)
               for role in ("predicted", "true")}
    if by_role["true"] is not None and by_role["predicted"] is not None:
        return [by_role["predicted"], by_role["true"]]
    return primary[:1]


def write_panel_set(panel_set: PanelSet, root: Path, prefix: str) -> list[dict[str, Any]]:
    """Write a panel set's files under ``root`` as ``prefix + name`` (``prefix`` may name a
    subfolder, e.g. ``"00-cat/grad_cam-t281-"``) and return its panel records with their file
    fields as those paths, relative to ``root``."""
    for name, data in panel_set.files.items():
        path = root / f"{prefix}{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return [{**panel, **{field: f"{prefix}{panel[field]}" for field in PANEL_FILE_FIELDS}}
            for panel in panel_set.record["panels"]]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
