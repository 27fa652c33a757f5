"""Faithfulness of a map: deletion and insertion scores (RISE protocol).

Petsiuk, Das & Saenko (2018), "RISE: Randomized Input Sampling for Explanation of Black-box
Models", https://arxiv.org/abs/1806.07421. A map ranks the pixels by its evidence for the
target class (highest value first; for signed maps that is the most positive evidence). Then,
in ``STEPS`` = 32 equal steps of ``H * W / 32`` pixels each:

* **deletion** replaces the top-ranked pixels with a fill (default: the model-input mean, 0 in
  the normalized space): the target probability should fall fast, so *lower is better*;
* **insertion** reveals the top-ranked pixels on a blurred copy of the image: the probability
  should rise fast, so *higher is better*.

A score is the mean target softmax probability over the 33 points of a curve (step 0 to step
32), an area under the curve in [0, 1]. RISE's code uses the trapezoid rule instead, which
weighs the two end points half; the plain mean is what convscope reports.

The insertion start is the image blurred with a Gaussian of sigma = ``INSERTION_BLUR_FRACTION``
(1/20) of the shorter input side, kernel +-3 sigma, reflect padding (11.2 px at 224 px). RISE's
own code blurs with an 11 x 11 kernel of sigma 5; on the demo photos that copy keeps 10-50 % of
the predicted class's probability, ours at most a few per mille -- insertion should start from
an image the model cannot recognize.

The same scores for random rankings (the mean over ``RANDOM_RANKINGS`` = 3 seeded ones) are
the reference a map must beat. They depend only on the image, the target and the fill, so
:func:`random_reference` is computed once per image x target and shared by every map of it.

All copies are evaluated in batches under inference mode, with the batch size and the
out-of-memory halving of :mod:`visualizations.batching`; progress and cancellation go through
the ``RunContext``. Ties in a map are broken by a fixed seeded permutation of the pixels, so
the result is deterministic and a flat region is removed in no particular spatial order (not
top rows first).

Caveat: removed pixels are a stimulus of their own (the fill colour, sharp edges against the
blur); the scores measure agreement with the model's response to *this* kind of removal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from app.errors import ModelOutputInvalid
from visualizations.base import RunContext
from visualizations.batching import choose_batch_size, for_each_batch
from visualizations.common import as_model_input, blurred, check_finite, prepare_model, upsample

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel

STEPS = 32
POINTS = STEPS + 1
RANDOM_RANKINGS = 3
RANDOM_SEEDS = (0, 1, 2)
TIE_BREAK_SEED = 12345
INSERTION_BLUR_FRACTION = 1 / 20
# Model evaluations: one map costs 2 curves x 33 points; the random reference three times that.
EVALUATIONS_PER_MAP = 2 * POINTS
REFERENCE_EVALUATIONS = RANDOM_RANKINGS * EVALUATIONS_PER_MAP


@dataclass(frozen=True)
class Curves:
    """Target probability at the 33 points of the deletion and insertion curves of one
    ranking: point k has ``removed_pixels(k)`` pixels removed (deletion) or revealed
    (insertion)."""

    deletion: tuple[float, ...]
    insertion: tuple[float, ...]

    @property
    def deletion_auc(self) -> float:
        return float(np.mean(self.deletion))

    @property
    def insertion_auc(self) -> float:
        return float(np.mean(self.insertion))


@dataclass(frozen=True)
class RandomReference:
    """The curves of ``RANDOM_RANKINGS`` seeded random rankings for one image and target."""

    target: int
    rankings: tuple[Curves, ...]

    @property
    def deletion_auc(self) -> float:
        return float(np.mean([curves.deletion_auc for curves in self.rankings]))

    @property
    def insertion_auc(self) -> float:
        return float(np.mean([curves.insertion_auc for curves in self.rankings]))


@dataclass(frozen=True)
class Faithfulness:
    """A map's deletion and insertion scores beside those of random rankings."""

    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    curves: Curves

    @property
    def deletion_gain(self) -> float:
        """How much faster than random the probability falls (positive: better than random)."""
        return self.random_deletion_auc - self.deletion_auc

    @property
    def insertion_gain(self) -> float:
        """How much faster than random the probability rises (positive: better than random)."""
        return self.insertion_auc - self.random_insertion_auc

    def to_dict(self) -> dict[str, float]:
        return {"deletion_auc": self.deletion_auc, "insertion_auc": self.insertion_auc,
                "random_deletion_auc": self.random_deletion_auc,
                "random_insertion_auc": self.random_insertion_auc}


@dataclass(frozen=True)
class PerturbationImages:
    """One preprocessed image with what deletion and insertion put in place of its pixels,
    all (1, C, H, W) on the model's device. Build it once per image with
    :func:`perturbation_images` and share it across targets and methods."""

    inputs: "torch.Tensor"
    fill: "torch.Tensor"
    blurred: "torch.Tensor"


def perturbation_images(batch: "torch.Tensor", fill: "torch.Tensor | None" = None
                        ) -> PerturbationImages:
    """``batch`` (1, C, H, W, normalized) with its deletion fill and insertion blur.

    ``fill`` is what deleted pixels become, in the model's normalized space: a (1, C, H, W)
    image or a (1, C, 1, 1) colour (e.g. a method's own fill); default: zeros, the model-input
    mean colour.
    """
    import torch

    if batch.ndim != 4 or batch.shape[0] != 1:
        raise ValueError(f"expected one (1, C, H, W) image, got shape {tuple(batch.shape)}")
    inputs = as_model_input(batch.detach())
    if fill is None:
        fill_image = torch.zeros_like(inputs)
    else:
        fill_image = fill.detach().to(inputs.device, inputs.dtype).expand_as(inputs)
    sigma = INSERTION_BLUR_FRACTION * min(inputs.shape[-2:])
    return PerturbationImages(inputs, as_model_input(fill_image.contiguous()),
                              as_model_input(blurred(inputs, sigma)))


def removed_pixels(step: int, pixels: int) -> int:
    """Pixels removed (or revealed) at point ``step`` of 0..STEPS: ``step * pixels // STEPS``."""
    return step * pixels // STEPS


def pixel_ranks(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Each pixel's place in the removal order (0 = first) for a 2-D map, as (H, W) int64.

    A map at another resolution is resized bilinearly to ``size`` first (as the methods
    upsample their own maps). Highest value first; ties in a fixed seeded random order.
    """
    import torch

    values = np.asarray(values)
    if values.ndim != 2 or values.size == 0:
        raise ModelOutputInvalid("A map to score must be a non-empty 2-D array.")
    if not np.isfinite(values).all():
        raise ModelOutputInvalid("A map to score contains NaN or infinite values.")
    if values.shape != tuple(size):
        tensor = torch.from_numpy(values.astype(np.float32)).reshape(1, 1, *values.shape)
        values = upsample(tensor, tuple(size)).reshape(size).numpy()
    flat = values.astype(np.float64).ravel()
    tie_break = np.random.default_rng(TIE_BREAK_SEED).permutation(flat.size)
    order = np.lexsort((tie_break, -flat))       # by value descending, then by tie_break
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(size)


def random_ranks(size: tuple[int, int], seed: int) -> np.ndarray:
    """A uniformly random removal order: a seeded permutation of the pixel ranks."""
    pixels = size[0] * size[1]
    return np.random.default_rng(seed).permutation(pixels).astype(np.int64).reshape(size)


def ranking_curves(model: "LoadedModel", images: PerturbationImages, rankings: list[np.ndarray],
                   target: int, context: RunContext | None = None) -> list[Curves]:
    """Deletion and insertion curves of the target's probability for each ranking, all
    ``len(rankings) * 66`` copies evaluated in shared batches."""
    import torch

    context = context or RunContext()
    inputs, device = images.inputs, images.inputs.device
    height, width = inputs.shape[-2:]
    pixels = height * width
    ranks = torch.from_numpy(np.stack(rankings)).to(device).view(len(rankings), 1, height, width)
    counts = torch.tensor([removed_pixels(step, pixels) for step in range(POINTS)],
                          device=device)
    total = len(rankings) * EVALUATIONS_PER_MAP
    probabilities = np.empty(total, dtype=np.float64)

    def process(start: int, stop: int) -> None:
        rows = torch.arange(start, stop, device=device)
        ranking, point = rows // EVALUATIONS_PER_MAP, rows % EVALUATIONS_PER_MAP
        deleting = (point < POINTS).view(-1, 1, 1, 1)
        chosen = ranks[ranking] < counts[point % POINTS].view(-1, 1, 1, 1)
        # Deletion keeps the image where a pixel is not chosen, insertion where it is.
        keep_image = torch.where(deleting, ~chosen, chosen)
        replacement = torch.where(deleting, images.fill, images.blurred)
        with torch.inference_mode():
            copies = as_model_input(torch.where(keep_image, inputs, replacement))
            logits = model.module(copies)
            check_finite(logits, "outputs for a perturbed image")
            scores = torch.softmax(logits.float(), dim=1)[:, target]
        probabilities[start:stop] = scores.cpu().numpy()

    with model.lock:
        prepare_model(model)
        size = choose_batch_size(model, inputs, context, backward=False)
        # Equal batches (66 at 16: 14, 14, 14, 14, 10 rather than 16, 16, 16, 16, 2): a tiny
        # last batch runs at a much lower throughput on a CPU.
        size = -(-total // -(-total // size))
        for_each_batch(total, size, process, context)
    rows = probabilities.reshape(len(rankings), 2, POINTS)
    return [Curves(tuple(map(float, row[0])), tuple(map(float, row[1]))) for row in rows]


def random_reference(model: "LoadedModel", images: PerturbationImages, target: int,
                     context: RunContext | None = None) -> RandomReference:
    """Deletion and insertion curves of ``RANDOM_RANKINGS`` seeded random rankings
    (``REFERENCE_EVALUATIONS`` = 198 model evaluations). Compute once per image x target."""
    size = tuple(images.inputs.shape[-2:])
    rankings = [random_ranks(size, seed) for seed in RANDOM_SEEDS]
    return RandomReference(target, tuple(ranking_curves(model, images, rankings, target,
                                                        context)))


def score_map(model: "LoadedModel", images: PerturbationImages, values: np.ndarray, target: int,
              reference: RandomReference, context: RunContext | None = None) -> Faithfulness:
    """Deletion and insertion scores of one 2-D map for ``target`` (``EVALUATIONS_PER_MAP`` =
    66 model evaluations), beside ``reference`` (from :func:`random_reference` for the same
    image, target and fill)."""
    if reference.target != target:
        raise ValueError(f"the reference is for class {reference.target}, not {target}")
    ranks = pixel_ranks(values, tuple(images.inputs.shape[-2:]))
    (curves,) = ranking_curves(model, images, [ranks], target, context)
    return Faithfulness(curves.deletion_auc, curves.insertion_auc, reference.deletion_auc,
                        reference.insertion_auc, curves)
