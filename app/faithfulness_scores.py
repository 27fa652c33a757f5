"""Faithfulness scores on every panel: which panels are scored, how, at what cost, and the
badge's verdict. The scoring itself is ``visualizations.faithfulness`` (RISE deletion and
insertion, Petsiuk et al. 2018); this module wires it into the one pipeline.

A panel is scored when it is a heatmap with a target and a map *of the input image*: image
panels (the occlusion grid, the adversarial image) and panels without a target get ``None``,
and so does the adversarial method's Grad-CAM of the *perturbed* image (scoring it on the
original image would measure nothing). The scored map is the 2-D array the panel shows; a
method whose map is low where the evidence is (partial occlusion: the target's probability
with each cell hidden) is ranked lowest value first. Deleted pixels take the method's own fill
when it has one (``fill`` of occlusion and partial occlusion), else the model-input mean.

The random reference depends only on the model, the image, the target and the fill, so a
``FaithfulnessScorer`` computes it once per image x target x fill and shares it across every
method of a job or a CLI run (a bounded least-recently-used cache, keyed by the model's
identity and a hash of the model-input tensor itself).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from visualizations import faithfulness as engine
from visualizations.context import RunContext

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta
    from visualizations.base import Panel

# Bumped when the scores of the same map change (protocol, steps, blur, rankings); part of the
# cache key of every visualization stored with scores.
FAITHFULNESS_VERSION = 1
# The exact keys of a panel record's "faithfulness".
SCORE_KEYS = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")

# Methods whose maps are low where the evidence for the target is.
LOWEST_FIRST = frozenset({"partial_occlusion"})
# Panels that are maps of another image than the input (title prefix, per method).
OTHER_IMAGE_TITLES = {"adversarial": ("Grad-CAM of the perturbed image",)}

# The badge: a map is "better than random" when, against the random rankings' mean, deleting
# its top pixels lowers the target probability's curve *and* revealing them raises it, each by
# at least MARGIN_FRACTION of the target's probability on the whole image (the scale of both
# curves: deletion starts there, insertion ends there), and at least MIN_MARGIN. On the
# region model of the tests a random map's gains reach 0.054 at probability 0.95 (margin
# 0.095); on the demo photos a random map's reach 0.04 at probability 0.15 on insertion, but
# never both at once.
MARGIN_FRACTION = 0.1
MIN_MARGIN = 0.01

REFERENCE_CACHE_SIZE = 256               # random references (a few kB each)
IMAGE_CACHE_SIZE = 2                     # perturbed-copy sources (3 input-sized tensors each)


# --- which panels, and their cost ---------------------------------------------------------------

def is_scored(method: str, panel: "Panel") -> bool:
    """Whether ``method``'s ``panel`` gets deletion and insertion scores."""
    if panel.kind != "heatmap" or panel.target is None:
        return False
    return not panel.title.startswith(OTHER_IMAGE_TITLES.get(method, ()))


def evidence_map(method: str, panel: "Panel") -> np.ndarray:
    """The panel's 2-D map oriented so that higher means more evidence for its target."""
    values = np.asarray(panel.values, dtype=np.float32)
    return -values if method in LOWEST_FIRST else values


def scored_panels(method: str, params: Mapping[str, Any], meta: "ModelMeta") -> int:
    """How many panels of one method for one target are scored (for the job's cost check;
    ``tests/visualizations/test_faithfulness_panels.py`` checks it against real runs)."""
    if method == "partial_occlusion":
        return min(int(params["top_k"]), meta.num_classes)
    if method == "adversarial":
        return 2 if meta.default_cam_layer is not None else 1
    return 1


def fill_key(params: Mapping[str, Any]) -> tuple[str, int | float | None]:
    """What deleted pixels become, as a hashable description: the method's ``fill`` (with the
    window that sizes a blur fill), else the model-input mean."""
    kind = str(params.get("fill", "mean"))
    if kind != "blur":
        return (kind, None)
    return (kind, params.get("window") or float(params.get("window_fraction", 0.25)))


def evaluations_per_target(methods: Sequence[Any], meta: "ModelMeta") -> int:
    """Model evaluations that scoring adds per image and requested target for ``methods``
    (objects with ``name`` and ``params``), an upper bound: 66 per scored panel, and 198 per
    random reference -- one per fill for the requested target, shared by the methods, plus one
    for every other class a method's panels are about (partial occlusion's other top classes,
    the adversarial method's original class)."""
    panels = sum(scored_panels(method.name, method.params, meta) for method in methods)
    references = len({fill_key(method.params) for method in methods})
    references += sum(scored_panels(method.name, method.params, meta) - 1 for method in methods)
    return engine.EVALUATIONS_PER_MAP * panels + engine.REFERENCE_EVALUATIONS * references


# --- the verdict ---------------------------------------------------------------------------------

def margin(probability: float) -> float:
    """How much each curve must beat random by, for a target of this probability."""
    return max(MIN_MARGIN, MARGIN_FRACTION * float(probability))


def verdict(scores: Mapping[str, float] | None, probability: float) -> dict[str, Any] | None:
    """What the panel's badge says about ``scores`` (a panel record's "faithfulness") for a
    target of ``probability`` on the whole image: ``{"better_than_random", "state" ("good",
    "mixed": one curve only, "poor"), "label", "summary"}``, or None for an unscored panel."""
    if not scores:
        return None
    needed = margin(probability)
    deletion_gain = scores["random_deletion_auc"] - scores["deletion_auc"]
    insertion_gain = scores["insertion_auc"] - scores["random_insertion_auc"]
    passes = {"deletion": deletion_gain >= needed, "insertion": insertion_gain >= needed}
    better = all(passes.values())
    summary = (f"Deletion AUC {scores['deletion_auc']:.3f} against "
               f"{scores['random_deletion_auc']:.3f} for random orders (lower is better: "
               f"{_by(deletion_gain, needed)}); insertion AUC {scores['insertion_auc']:.3f} "
               f"against {scores['random_insertion_auc']:.3f} (higher is better: "
               f"{_by(insertion_gain, needed)}). Better than random means both by at least "
               f"{needed:.3f}, a tenth of the class probability.")
    # One curve alone is worth saying: on photos, deletion against random pixel orders is
    # harsh (scattered fill pixels act as noise), so a map can beat random on insertion only.
    only = [name for name, passed in passes.items() if passed]
    if better:
        label, state = "faithful: better than random", "good"
    elif only:
        label, state = f"better than random on {only[0]} only", "mixed"
    else:
        label, state = "no better than random", "poor"
    return {"better_than_random": better, "state": state, "label": label, "summary": summary}


def panel_verdict(panel: Mapping[str, Any]) -> dict[str, Any] | None:
    """``verdict`` of a panel record (its "faithfulness", its target's probability)."""
    scores, target = panel.get("faithfulness"), panel.get("target")
    if not scores or not target:
        return None
    return verdict(scores, float(target["probability"]))


def _by(gain: float, needed: float) -> str:
    if gain >= needed:
        return f"better by {gain:.3f}"
    return f"better by only {gain:.3f}" if gain > 0 else f"worse by {-gain:.3f}"


# --- scoring -------------------------------------------------------------------------------------

def method_fill(params: Mapping[str, Any], meta: "ModelMeta",
                inputs: "torch.Tensor") -> "torch.Tensor | None":
    """The deletion fill of ``fill_key(params)`` as a (1, C, H, W) image (None: the mean)."""
    from visualizations.occlusion import fill_image
    from visualizations.partial_occlusion import window_side

    kind, size = fill_key(params)
    if kind == "mean":
        return None
    window = (int(size) if isinstance(size, int) and not isinstance(size, bool)
              else window_side(float(size or 0.25), min(inputs.shape[-2:])))
    return fill_image(kind, meta, inputs, window)


class FaithfulnessScorer:
    """Scores panels, computing each random reference once per model x image x target x fill
    (least recently used entries dropped beyond ``REFERENCE_CACHE_SIZE``). One per job or CLI
    run; not shared between threads."""

    def __init__(self, reference_cache_size: int = REFERENCE_CACHE_SIZE) -> None:
        self._references: OrderedDict[tuple, engine.RandomReference] = OrderedDict()
        self._images: OrderedDict[tuple, engine.PerturbationImages] = OrderedDict()
        self._reference_cache_size = reference_cache_size

    def score_panels(self, model: "LoadedModel", method: str, params: Mapping[str, Any],
                     batch: "torch.Tensor", panels: Sequence["Panel"],
                     context: RunContext | None = None) -> list[dict[str, float] | None]:
        """Each panel's ``{"deletion_auc", "insertion_auc", "random_deletion_auc",
        "random_insertion_auc"}``, or None where it is not scored (``is_scored``)."""
        chosen = [number for number, panel in enumerate(panels) if is_scored(method, panel)]
        scores: list[dict[str, float] | None] = [None] * len(panels)
        if not chosen:
            return scores
        context = context or RunContext()
        batch = batch.detach().to(model.device)
        image_key = self._image_key(model, batch, params)
        images = self._perturbation_images(model, batch, params, image_key)
        for done, number in enumerate(chosen):
            panel = panels[number]
            # This panel's share of the progress: its reference (198 evaluations, when not
            # cached) in the first three quarters, its own 66 in the last.
            start, stop = done / len(chosen), (done + 1) / len(chosen)
            middle = start + 0.75 * (stop - start)
            reference = self._reference(model, images, image_key, panel.target.index,
                                        _share(context, start, middle))
            result = engine.score_map(model, images, evidence_map(method, panel),
                                      panel.target.index, reference,
                                      _share(context, middle, stop))
            scores[number] = {key: float(value) for key, value in result.to_dict().items()}
        return scores

    def _image_key(self, model: "LoadedModel", batch: "torch.Tensor",
                   params: Mapping[str, Any]) -> tuple:
        """The model (its checkpoint's sha256; an unnamed in-memory model by its object), the
        image as the model gets it (the normalized input tensor's bytes: any preprocessing
        change is a new key) and the fill."""
        digest = hashlib.sha256(batch.float().cpu().contiguous().numpy().tobytes()).hexdigest()
        model_identity = model.meta.sha256 or f"module-{id(model.module)}"
        return (model_identity, digest, tuple(batch.shape), fill_key(params))

    def _perturbation_images(self, model: "LoadedModel", batch: "torch.Tensor",
                             params: Mapping[str, Any], key: tuple) -> engine.PerturbationImages:
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        images = engine.perturbation_images(batch, method_fill(params, model.meta, batch))
        self._images[key] = images
        while len(self._images) > IMAGE_CACHE_SIZE:
            self._images.popitem(last=False)
        return images

    def _reference(self, model: "LoadedModel", images: engine.PerturbationImages,
                   image_key: tuple, target: int,
                   context: RunContext) -> engine.RandomReference:
        key = (*image_key, target)
        if key in self._references:
            self._references.move_to_end(key)
            return self._references[key]
        reference = engine.random_reference(model, images, target, context)
        self._references[key] = reference
        while len(self._references) > self._reference_cache_size:
            self._references.popitem(last=False)
        return reference


def _share(context: RunContext, start: float, stop: float) -> RunContext:
    """``context`` reporting its progress 0..1 as ``start``..``stop`` of the whole."""
    progress: Callable[[float], None] | None = None
    if context.progress is not None:
        progress = lambda fraction: context.report(start + (stop - start) * fraction)  # noqa: E731
    return RunContext(progress=progress, cancel_event=context.cancel_event,
                      batch_size=context.batch_size)
