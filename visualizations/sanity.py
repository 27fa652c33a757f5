"""Sanity check of a method: does its map change when the model's weights are randomized?

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim (2018), "Sanity Checks for Saliency Maps",
https://arxiv.org/abs/1810.03292, cascading model-parameter randomization: re-initialize the
trained model's layers cumulatively from the output back to the input
(:mod:`visualizations.randomization`: per block, seeded, torch's own initializers), recompute
the map after each step for every image -- always for the class the *trained* model predicted
-- and compare it with the trained model's map. Per step we report the median over images of

* the Spearman rank correlation of |map| with the original |map|, and
* SSIM of the two |maps| after min-max scaling each to [0, 1].

A map that explains the model must stop resembling the original once the model is random.
The check **passes** when the last step's (everything randomized) median Spearman is below
``SPEARMAN_THRESHOLD`` = 0.5. The paper gives no cut-off; 0.5 is ours: a map whose ranking
keeps a correlation of 0.5 or more with its original after *every* weight is random shares at
least a quarter of its rank variance with something other than the model -- in practice the
image's own edges and colours, the "edge detector" behaviour the paper found in Guided
Backprop and Guided Grad-CAM. An image-only map (gradient magnitude of the image) scores 1.0;
two unrelated maps score about 0. Both numbers per step are kept for the full curve.

The caller's model is never touched: the check works on one deep copy, made under the model's
lock. Progress and cancellation go through the ``RunContext``; the method itself runs through
``Visualization.run``, so its batching, out-of-memory fallback and hook cleanup apply.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from app.errors import BadParameter, MethodUnsupported
from model_adapters.base import LoadedModel
from visualizations.base import RunContext, Visualization, VisualizationResult, params_to_dict
from visualizations.common import seeded
from visualizations.randomization import (MAX_STEPS, RandomizationStep, randomization_steps,
                                          reinitialize)
from visualizations.similarity import normalized, spearman, ssim

if TYPE_CHECKING:
    import torch

    from model_adapters.base import ModelMeta

SPEARMAN_THRESHOLD = 0.5


@dataclass(frozen=True)
class SanityStep:
    """The maps after randomizing everything from the output down to ``randomized``."""

    randomized: str
    spearman: float                        # median over images
    ssim: float                            # median over images
    spearman_per_image: tuple[float, ...]
    ssim_per_image: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"randomized": self.randomized, "spearman": self.spearman, "ssim": self.ssim}


@dataclass(frozen=True)
class SanityResult:
    """A cascading randomization check of one method on one checkpoint."""

    method: str
    checkpoint: str
    params: dict[str, Any]
    images: int
    steps: tuple[SanityStep, ...]          # from the top (output) layer down to the input
    threshold: float
    targets: tuple[int, ...]               # the trained model's prediction per image

    @property
    def passed(self) -> bool:
        """The map changed: the last step's median Spearman is below the threshold."""
        return self.steps[-1].spearman < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "checkpoint": self.checkpoint, "params": self.params,
                "images": self.images, "steps": [step.to_dict() for step in self.steps],
                "passed": self.passed, "threshold": self.threshold}


def sanity_cost(visualization: Visualization, params: Any, meta: "ModelMeta", images: int,
                steps: int | None = None) -> int:
    """Model evaluations the check needs: per image one prediction, then the map (the
    method's cost plus the prediction ``run`` makes) on the trained model and after each
    step; plus two probe passes: one orders the layers, one measures the copy's activation
    memory for batch sizing (only methods that batch make it). ``steps=None``: the upper bound
    ``MAX_STEPS`` (the real count needs the loaded model: ``len(randomization_steps(...))``)."""
    steps = MAX_STEPS if steps is None else steps
    per_map = visualization.cost(params, meta) + 1
    return 2 + images * (1 + (steps + 1) * per_map)


def sanity_check(model: LoadedModel, batches: Sequence["torch.Tensor"],
                 visualization: Visualization, params: Any,
                 context: RunContext | None = None, *, seed: int = 0,
                 threshold: float = SPEARMAN_THRESHOLD,
                 max_steps: int | None = MAX_STEPS) -> SanityResult:
    """Run the cascading randomization check of ``visualization`` on ``model``.

    ``batches``: preprocessed (1, C, H, W) images. ``params``: resolved Params (a mapping is
    parsed and resolved). ``seed`` fixes the random weights; ``max_steps`` the grouping (see
    :func:`visualizations.randomization.randomization_steps`).
    """
    context = context or RunContext()
    if isinstance(params, Mapping) or params is None:
        params = visualization.parse_params(params, model.meta)
    reason = visualization.supports(model.meta)
    if reason:
        raise MethodUnsupported(reason)
    params = visualization.resolve(params, model.meta)
    if not batches:
        raise BadParameter("The sanity check needs at least one image.",
                           fields={"images": "at least one"})
    batches = [batch.to(model.device) for batch in batches]
    if any(batch.ndim != 4 or batch.shape[0] != 1 for batch in batches):
        raise ValueError("each batch must be one (1, C, H, W) image")

    with model.lock:   # no method's hooks are on the model while it is copied
        working = LoadedModel(copy.deepcopy(model.module), model.meta, model.device)
    steps = randomization_steps(working.module, batches[0], max_steps)
    if not steps:
        raise MethodUnsupported("The model has no parameters to randomize.")
    progress = _Progress(context, len(batches) * (len(steps) + 1))

    targets = [int(working.predict(batch)[0].argmax()) for batch in batches]
    originals = [np.abs(_map(visualization, working, batch, target, params, progress))
                 for batch, target in zip(batches, targets)]
    results = []
    for number, step in enumerate(steps):
        context.check_cancelled()
        with seeded(model.device, seed + number):
            reinitialize(working.module, step)
        results.append(_compare(step, originals, [
            np.abs(_map(visualization, working, batch, target, params, progress))
            for batch, target in zip(batches, targets)]))
    context.report(1.0)
    return SanityResult(visualization.name, model.meta.checkpoint_file, params_to_dict(params),
                        len(batches), tuple(results), float(threshold), tuple(targets))


def _compare(step: RandomizationStep, originals: list[np.ndarray],
             maps: list[np.ndarray]) -> SanityStep:
    rank_correlations = [spearman(original, current)
                         for original, current in zip(originals, maps)]
    similarities = [ssim(normalized(original), normalized(current))
                    for original, current in zip(originals, maps)]
    return SanityStep(step.name, float(np.median(rank_correlations)),
                      float(np.median(similarities)), tuple(rank_correlations),
                      tuple(similarities))


def _map(visualization: Visualization, model: LoadedModel, batch: "torch.Tensor", target: int,
         params: Any, progress: "_Progress") -> np.ndarray:
    """The method's map for ``target`` (its first heatmap panel for that class)."""
    result = visualization.run(model, batch, [target], params, progress.next_run())
    values = _target_heatmap(result, target)
    progress.finish_run()
    return values


def _target_heatmap(result: VisualizationResult, target: int) -> np.ndarray:
    heatmaps = [panel for panel in result.panels if panel.kind == "heatmap"]
    for panel in heatmaps:
        if panel.target is not None and panel.target.index == target:
            return np.asarray(panel.values, dtype=np.float64)
    if heatmaps:
        return np.asarray(heatmaps[0].values, dtype=np.float64)
    raise MethodUnsupported(f"{result.method} produces no map to compare.")


class _Progress:
    """Maps each method run's 0..1 onto its share of the whole check; only moves forward."""

    def __init__(self, context: RunContext, runs: int) -> None:
        self.context, self.runs, self.done, self.reported = context, max(1, runs), 0, 0.0

    def _report(self, fraction: float) -> None:
        self.reported = max(self.reported, min(1.0, (self.done + fraction) / self.runs))
        self.context.report(self.reported)

    def next_run(self) -> RunContext:
        self.context.check_cancelled()
        return RunContext(progress=self._report, cancel_event=self.context.cancel_event,
                          batch_size=self.context.batch_size)

    def finish_run(self) -> None:
        self.done += 1
        self._report(0.0)
