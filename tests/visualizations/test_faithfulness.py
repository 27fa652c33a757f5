"""Deletion and insertion scores (RISE) against hand-computed curves and random rankings.

The main test model reads only one 8 x 8 region of a 32 x 32 image, and only its fine
checkerboard pattern: P(class 0) = sigmoid(GAIN * mean over the region of (channel 0 x pattern)
+ BIAS). With the pattern in the image each region pixel contributes exactly 1 to that mean, so
the probability after removing any pixels is a closed-form function of how many region pixels
are gone -- the expected curves below are computed from that formula (and, for insertion, from
scipy's Gaussian filter as the blur), never by running the scoring code.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from app.errors import Cancelled, ModelOutputInvalid
from model_adapters.base import LoadedModel
from tests.visualizations.conftest import record
from tests.visualizations.models import shape_images, wrap
from visualizations import visualization_registry
from visualizations.base import RunContext
from visualizations.faithfulness import (EVALUATIONS_PER_MAP, INSERTION_BLUR_FRACTION, POINTS,
                                         REFERENCE_EVALUATIONS, STEPS, perturbation_images,
                                         random_reference, score_map)

SIDE = 32
TOP, LEFT, REGION = 8, 16, 8          # 64 region pixels = exactly two steps of 32 pixels
GAIN, BIAS = 6.0, -3.0


def checkerboard(size: int) -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((rows + columns) % 2 * 2 - 1).float()


class CheckerRegionModel(nn.Module):
    """Two classes: logit 0 = GAIN * mean_region(channel 0 x checkerboard) + BIAS, logit 1 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pattern", checkerboard(REGION))
        self.gain = nn.Parameter(torch.tensor(GAIN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, 0, TOP:TOP + REGION, LEFT:LEFT + REGION]
        score = self.gain * (region * self.pattern).mean(dim=(1, 2)) + BIAS
        return torch.stack([score, torch.zeros_like(score)], dim=1)


@pytest.fixture
def region_model() -> LoadedModel:
    return wrap(CheckerRegionModel(), class_names=("pattern", "other"))


@pytest.fixture
def region_image() -> torch.Tensor:
    """Noise in [-1, 1] everywhere, the checkerboard in channel 0 of the region."""
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, SIDE, SIDE, generator=generator) * 2 - 1
    image[0, 0, TOP:TOP + REGION, LEFT:LEFT + REGION] = checkerboard(REGION)
    return image


def region_mask() -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    mask[TOP:TOP + REGION, LEFT:LEFT + REGION] = True
    return mask


def sigmoid(value: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(value, dtype=np.float64)))


def pixels_at(step: int) -> int:
    return step * SIDE * SIDE // STEPS


def test_deletion_auc_of_a_hand_computable_case(region_model, region_image) -> None:
    # Region first (ties inside it do not matter: every region pixel contributes the same 1).
    values = region_mask().astype(np.float32)
    images = perturbation_images(region_image)
    reference = random_reference(region_model, images, 0)
    scores = score_map(region_model, images, values, 0, reference)
    region_pixels = REGION * REGION
    removed = np.minimum([pixels_at(step) for step in range(POINTS)], region_pixels)
    expected_curve = sigmoid(GAIN * (1 - removed / region_pixels) + BIAS)
    np.testing.assert_allclose(scores.curves.deletion, expected_curve, atol=1e-6)
    assert scores.deletion_auc == pytest.approx(expected_curve.mean(), abs=1e-6)


def test_insertion_auc_of_a_hand_computable_case(region_model, region_image) -> None:
    # Distinct values inside the region: revealed in raster order, rest of the image after.
    values = np.zeros((SIDE, SIDE), dtype=np.float32)
    values[region_mask()] = 2.0 - np.arange(REGION * REGION) / (REGION * REGION)
    images = perturbation_images(region_image)
    scores = score_map(region_model, images, values, 0, random_reference(region_model, images, 0))

    # Independent blur: scipy's Gaussian with torch's "reflect" padding (scipy "mirror"),
    # truncated at the same +-ceil(3 sigma) pixels.
    sigma = INSERTION_BLUR_FRACTION * SIDE
    radius = int(np.ceil(3 * sigma))
    blurred = gaussian_filter(region_image[0, 0].double().numpy(), sigma, mode="mirror",
                              truncate=radius / sigma)
    pattern = checkerboard(REGION).double().numpy()
    blurred_terms = (blurred[TOP:TOP + REGION, LEFT:LEFT + REGION] * pattern).ravel()
    expected = []
    for step in range(POINTS):
        revealed = min(pixels_at(step), REGION * REGION)
        terms = np.concatenate([np.ones(revealed), blurred_terms[revealed:]])
        expected.append(sigmoid(GAIN * terms.mean() + BIAS))
    np.testing.assert_allclose(scores.curves.insertion, expected, atol=1e-5)
    assert scores.insertion_auc == pytest.approx(float(np.mean(expected)), abs=1e-5)
    assert expected[0] < 0.2, "the blurred start should hide the pattern from the model"


def test_occlusion_beats_random_and_a_random_map_does_not(region_model, region_image) -> None:
    occlusion = visualization_registry.get("occlusion").run(region_model, region_image, [0], {})
    (panel,) = occlusion.panels
    images = perturbation_images(region_image)
    reference = random_reference(region_model, images, 0)
    good = score_map(region_model, images, panel.values, 0, reference)
    noise = np.random.default_rng(7).random((SIDE, SIDE))
    random_map = score_map(region_model, images, noise, 0, reference)
    record("faithfulness, region model (occlusion / random map / random ranking)",
           f"deletion {good.deletion_auc:.3f} / {random_map.deletion_auc:.3f} / "
           f"{reference.deletion_auc:.3f}, insertion {good.insertion_auc:.3f} / "
           f"{random_map.insertion_auc:.3f} / {reference.insertion_auc:.3f}")
    assert good.deletion_auc < reference.deletion_auc - 0.25
    assert good.insertion_auc > reference.insertion_auc + 0.25
    assert good.deletion_gain > 0.25 and good.insertion_gain > 0.25
    assert abs(random_map.deletion_auc - reference.deletion_auc) < 0.05
    assert abs(random_map.insertion_auc - reference.insertion_auc) < 0.05


def test_occlusion_beats_random_on_the_trained_shape_model(shape_model) -> None:
    data = shape_images(12, seed=5, with_empty=False)
    deletion_gains, insertion_gains = [], []
    for image in data.images[:4]:
        batch = image[None]
        result = visualization_registry.get("occlusion").run(shape_model, batch, None, {})
        target = result.panels[0].target.index
        images = perturbation_images(batch)
        reference = random_reference(shape_model, images, target)
        scores = score_map(shape_model, images, result.panels[0].values, target, reference)
        deletion_gains.append(scores.deletion_gain)
        insertion_gains.append(scores.insertion_gain)
    record("faithfulness, shape model occlusion gains (deletion, insertion)",
           f"{np.round(deletion_gains, 3).tolist()}, {np.round(insertion_gains, 3).tolist()}")
    # Deletion only: the model reads the square's colour, which a blur keeps, so insertion
    # starts near probability 1 for every ranking and cannot tell maps apart on this task.
    assert min(deletion_gains) > 0.3


def test_ties_are_not_broken_in_raster_order(region_model, region_image) -> None:
    # Raster order would delete the rows above the region first (a slow, "faithful-looking"
    # start here); a flat map must score like a random ranking.
    images = perturbation_images(region_image)
    reference = random_reference(region_model, images, 0)
    flat = score_map(region_model, images, np.ones((SIDE, SIDE)), 0, reference)
    assert abs(flat.deletion_auc - reference.deletion_auc) < 0.05
    assert abs(flat.insertion_auc - reference.insertion_auc) < 0.05
    again = score_map(region_model, images, np.ones((SIDE, SIDE)), 0, reference)
    assert again == flat


def test_a_lower_resolution_map_is_upsampled(region_model, region_image) -> None:
    coarse = np.zeros((4, 4), dtype=np.float32)      # 8-px cells; the region is cell (1, 2)
    coarse[TOP // 8, LEFT // 8] = 1.0
    images = perturbation_images(region_image)
    reference = random_reference(region_model, images, 0)
    scores = score_map(region_model, images, coarse, 0, reference)
    assert scores.deletion_auc < reference.deletion_auc - 0.2
    assert scores.insertion_auc > reference.insertion_auc + 0.2


def test_a_fill_equal_to_the_image_deletes_nothing(region_model, region_image) -> None:
    original = float(region_model.predict(region_image)[0, 0])
    images = perturbation_images(region_image, fill=region_image)
    scores = score_map(region_model, images, np.random.default_rng(0).random((SIDE, SIDE)), 0,
                       random_reference(region_model, images, 0))
    np.testing.assert_allclose(scores.curves.deletion, original, atol=1e-6)
    colour = perturbation_images(region_image, fill=torch.full((1, 3, 1, 1), 0.25))
    assert float(colour.fill.min()) == float(colour.fill.max()) == 0.25


def test_scores_do_not_depend_on_the_batch_size(shape_model) -> None:
    batch = shape_images(1, seed=9, with_empty=False).images
    images = perturbation_images(batch)
    values = np.random.default_rng(1).random((SIDE, SIDE))
    results = []
    for size in (1, 5, None):
        context = RunContext(batch_size=size)
        reference = random_reference(shape_model, images, 0, context)
        results.append(score_map(shape_model, images, values, 0, reference, context))
    for other in results[1:]:
        np.testing.assert_allclose(other.curves.deletion, results[0].curves.deletion, atol=1e-6)
        np.testing.assert_allclose(other.curves.insertion, results[0].curves.insertion, atol=1e-6)
        for key, value in other.to_dict().items():
            assert value == pytest.approx(results[0].to_dict()[key], abs=1e-6)


def test_progress_and_cancel(region_model, region_image) -> None:
    images = perturbation_images(region_image)
    seen: list[float] = []
    reference = random_reference(region_model, images, 0,
                                 RunContext(progress=seen.append, batch_size=16))
    assert len(seen) == -(-REFERENCE_EVALUATIONS // 16)
    assert seen == sorted(seen) and seen[-1] == 1.0

    cancel = threading.Event()

    def cancel_after_first(fraction: float) -> None:
        cancel.set()

    context = RunContext(progress=cancel_after_first, cancel_event=cancel, batch_size=8)
    with pytest.raises(Cancelled):
        score_map(region_model, images, np.ones((SIDE, SIDE)), 0, reference, context)
    assert EVALUATIONS_PER_MAP == 66 and REFERENCE_EVALUATIONS == 198


def test_result_record_and_refusals(region_model, region_image) -> None:
    images = perturbation_images(region_image)
    reference = random_reference(region_model, images, 0)
    scores = score_map(region_model, images, region_mask(), 0, reference)
    record_ = scores.to_dict()
    assert set(record_) == {"deletion_auc", "insertion_auc", "random_deletion_auc",
                            "random_insertion_auc"}
    assert all(isinstance(value, float) and 0.0 <= value <= 1.0 for value in record_.values())
    assert len(scores.curves.deletion) == len(scores.curves.insertion) == POINTS
    bad = np.ones((SIDE, SIDE))
    bad[0, 0] = np.nan
    with pytest.raises(ModelOutputInvalid):
        score_map(region_model, images, bad, 0, reference)
    with pytest.raises(ModelOutputInvalid):
        score_map(region_model, images, np.ones((3, SIDE, SIDE)), 0, reference)
    with pytest.raises(ValueError):
        score_map(region_model, images, bad, 1, reference)
