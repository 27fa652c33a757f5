"""Do the maps point at what the model really uses?

* A small CNN trained here on "a coloured square somewhere on noise" (class = colour): each
  method's map must peak on the square for nearly all held-out images. This is a regression
  check of the plumbing, *not* evidence on its own: a map that uses no model at all (per-pixel
  colour saturation) also finds the square every time (measured below). The evidence that the
  maps follow the model is the pointing game on real photos, ``test_pointing_game.py``, which
  model-free maps fail.
* Sanity check (Adebayo et al. 2018, https://arxiv.org/abs/1810.03292): re-initializing the
  weights must change every weight-dependent map (Spearman rank correlation well below 1).
* Models whose answer is known in closed form: one that only sees the top-left quadrant
  (occlusion), a linear model (saliency = |weights|), exact CAM, Grad-CAM = CAM / (h*w) for a
  GAP+linear head, and completeness of integrated gradients.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model_adapters.base import LoadedModel
from tests.visualizations.conftest import record
from tests.visualizations.models import (SHAPE_CLASS_NAMES, FullResolutionCam, LinearModel,
                                         QuadrantModel, TinyCnn, shape_images, wrap)
from visualizations import visualization_registry

TEST_IMAGES = 50

# (method, params, minimum hit rate). Measured: 1.00 for every row (training seeds 0, 1, 2);
# the thresholds leave room for other CPUs' float rounding, not for a broken method.
GROUND_TRUTH_CASES = [
    ("saliency", {}, 0.9),
    ("saliency", {"smoothgrad_samples": 0}, 0.9),
    ("integrated_gradients", {"baseline": "mean"}, 0.9),
    ("integrated_gradients", {"baseline": "black"}, 0.9),
    ("integrated_gradients", {"baseline": "blurred"}, 0.9),
    ("integrated_gradients", {"baseline": "noise"}, 0.9),
    ("occlusion", {}, 0.9),
    ("partial_occlusion", {}, 0.9),
    ("cam", {}, 0.9),
    ("grad_cam", {}, 0.9),
    ("guided_grad_cam", {}, 0.9),
]


def peak(values: np.ndarray, lowest: bool = False) -> tuple[float, float]:
    """Row and column of the map's extreme; for a plateau (partial occlusion's cells) the
    plateau's centre."""
    signed = -values if lowest else values
    top = signed.max()
    rows, columns = np.nonzero(signed >= top - 1e-6 * max(1.0, abs(float(top))))
    return float(rows.mean()), float(columns.mean())


def on_square(point: tuple[float, float], box: tuple[int, int, int]) -> bool:
    top, left, size = box
    row, column = point
    return top <= row < top + size and left <= column < left + size


@pytest.fixture(scope="module")
def held_out() -> object:
    return shape_images(TEST_IMAGES, seed=2, with_empty=False)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "params", "minimum"), GROUND_TRUTH_CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}"
                              for m, p, _ in GROUND_TRUTH_CASES])
def test_map_peaks_on_the_square(shape_model: LoadedModel, held_out, method: str,
                                 params: dict, minimum: float) -> None:
    visualization = visualization_registry.get(method)
    hits = 0
    for index in range(TEST_IMAGES):
        label = int(held_out.labels[index])
        result = visualization.run(shape_model, held_out.images[index:index + 1], [label],
                                   params)
        panel = result.panels[0]
        assert panel.target is not None and panel.target.index == label
        # Partial occlusion maps the class probability: the square is where it is *lowest*.
        point = peak(panel.values, lowest=(method == "partial_occlusion"))
        hits += on_square(point, held_out.boxes[index])
    rate = hits / TEST_IMAGES
    name = f"hit rate {method} {params or ''}".strip()
    record(name, f"{rate:.2f} ({hits}/{TEST_IMAGES})")
    print(f"{name}: {rate:.2f}")
    assert rate >= minimum, f"{method} peaked on the square for only {hits}/{TEST_IMAGES} images"


def test_saturation_alone_solves_the_synthetic_task(held_out) -> None:
    """Why this file is no evidence by itself: the square is the only saturated thing."""
    from tests.visualizations.pointing_game import peak

    pixels = held_out.images.numpy() * 0.5 + 0.5                       # back to [0, 1]
    saturation = pixels.max(axis=1) - pixels.min(axis=1)               # (N, H, W)
    hits = sum(on_square(peak(saturation[index]), held_out.boxes[index])
               for index in range(TEST_IMAGES))
    record("synthetic task, model-free saturation", f"{hits}/{TEST_IMAGES}")
    assert hits >= 0.9 * TEST_IMAGES


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; 0 when either map is constant (no ranking to compare)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "params"), [
    ("saliency", {"smoothgrad_samples": 0}), ("saliency", {"smoothgrad_samples": 8}),
    ("integrated_gradients", {}),
    ("grad_cam", {"relu": False}), ("guided_grad_cam", {}), ("cam", {}), ("occlusion", {})])
def test_randomized_weights_change_the_map(shape_model: LoadedModel, method: str,
                                           params: dict) -> None:
    randomized_module = copy.deepcopy(shape_model.module)
    torch.manual_seed(123)
    for module in randomized_module.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    randomized = wrap(randomized_module, class_names=SHAPE_CLASS_NAMES)
    images = shape_images(8, seed=3, with_empty=False)
    visualization = visualization_registry.get(method)
    same, changed = [], []
    for index in range(len(images.labels)):
        image, label = images.images[index:index + 1], [int(images.labels[index])]
        trained_map = visualization.run(shape_model, image, label, params).panels[0].values
        again = visualization.run(shape_model, image, label, params).panels[0].values
        random_map = visualization.run(randomized, image, label, params).panels[0].values
        same.append(spearman(trained_map, again))
        changed.append(spearman(trained_map, random_map))
    record(f"rank correlation trained vs randomized, {method} {params or ''}".strip(),
           f"mean {np.mean(changed):.2f}, max {np.max(changed):.2f}")
    assert min(same) > 0.99, "the same model and image must give the same map"
    assert np.mean(changed) < 0.5 and max(changed) < 0.8


def test_occlusion_signal_stays_in_the_quadrant_the_model_sees() -> None:
    torch.manual_seed(0)
    model = wrap(QuadrantModel())
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    occlusion = visualization_registry.get("occlusion")
    # Windows aligned with the quadrant: hiding anything outside it changes nothing.
    aligned = occlusion.run(model, image, None, {"window": 4, "stride": 4}).panels[0].values
    assert np.abs(aligned[:16, :16]).sum() > 0
    assert np.abs(aligned[16:, :]).max() < 1e-6 and np.abs(aligned[:, 16:]).max() < 1e-6
    # Default windows (4 px, stride 2) overlap the border by at most one window.
    default = occlusion.run(model, image, None, {}).panels[0].values
    inside = np.abs(default[:20, :20]).sum()
    assert inside / np.abs(default).sum() > 0.999
    assert np.abs(default[20:, :]).max() < 1e-6 and np.abs(default[:, 20:]).max() < 1e-6


def test_partial_occlusion_only_moves_where_the_model_looks() -> None:
    torch.manual_seed(0)
    model = wrap(QuadrantModel())
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    result = visualization_registry.get("partial_occlusion").run(
        model, image, None, {"positions": 4, "window_fraction": 0.25})
    first = result.panels[0]
    assert first.value_range == (0.0, 1.0)
    probability = first.target.probability
    # Cells whose window lies outside the quadrant leave the probability unchanged.
    assert np.allclose(first.values[24:, :], probability, atol=1e-5)
    assert np.allclose(first.values[:, 24:], probability, atol=1e-5)
    assert not np.allclose(first.values[:8, :8], probability, atol=1e-4)


def test_saliency_of_a_linear_model_is_the_absolute_weights() -> None:
    torch.manual_seed(0)
    module = LinearModel(side=8, channels=3, classes=4)
    model = wrap(module, side=8)
    image = torch.randn(1, 3, 8, 8)
    result = visualization_registry.get("saliency").run(model, image, [2], {})
    expected = module.linear.weight[2].detach().view(3, 8, 8).abs().amax(dim=0).numpy()
    np.testing.assert_allclose(result.panels[0].values, expected, rtol=1e-5, atol=1e-7)


def test_cam_is_exact_for_a_gap_linear_head() -> None:
    torch.manual_seed(0)
    module = FullResolutionCam()
    model = wrap(module)
    image = torch.randn(1, 3, 32, 32)
    result = visualization_registry.get("cam").run(model, image, [1], {})
    cam = result.panels[0].values
    with torch.no_grad():
        logit = float(module(image)[0, 1])
    # mean over pixels of sum_k W[c,k] A_k(x,y), plus the bias, is the logit itself.
    bias = float(module.fc.bias[1].detach())
    assert cam.mean() + bias == pytest.approx(logit, rel=1e-4, abs=1e-5)


def test_grad_cam_equals_cam_over_the_map_size_for_gap_linear_heads() -> None:
    torch.manual_seed(0)
    model = wrap(TinyCnn(classes=3))
    image = torch.randn(1, 3, 32, 32)
    cam = visualization_registry.get("cam").run(model, image, [0], {}).panels[0].values
    grad_cam = visualization_registry.get("grad_cam").run(
        model, image, [0], {"relu": False}).panels[0].values
    feature_cells = 16 * 16  # TinyCnn's last feature map for a 32 px input
    np.testing.assert_allclose(grad_cam * feature_cells, cam, rtol=1e-3, atol=1e-4)


def test_integrated_gradients_add_up_to_the_logit_difference() -> None:
    torch.manual_seed(0)
    module = TinyCnn(classes=3).eval()
    model = wrap(module)
    image = torch.randn(1, 3, 32, 32) * 0.5
    result = visualization_registry.get("integrated_gradients").run(
        model, image, [2], {"steps": 128, "baseline": "black"})
    black = torch.full_like(image, -1.0)  # pixel 0 with mean = std = 0.5
    with torch.no_grad():
        difference = float(module(image)[0, 2] - module(black)[0, 2])
    total = float(result.panels[0].values.sum())
    assert total == pytest.approx(difference, rel=0.02, abs=1e-3)
