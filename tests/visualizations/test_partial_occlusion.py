"""Partial occlusion never shows a value for a pixel that no window hid.

The reference does not use the method's grid: a model whose class-0 logit is a weighted sum
over the pixels the fill hid (random positive weights, so every rectangle gives its own
probability) lets the test enumerate *every* rectangle of the window's size and check that each
pixel's value is the probability of one that contains the pixel.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.errors import BadParameter
from tests.visualizations.models import wrap
from visualizations import visualization_registry

PARTIAL = visualization_registry.get("partial_occlusion")


class HiddenPixelModel(nn.Module):
    """logit 0 = sum of random positive weights over the pixels equal to the fill (0 in the
    normalized input: the "mean" fill); logit 1 = 0."""

    def __init__(self, height: int, width: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weights = torch.rand(height, width, generator=generator) * 4.0 / (height * width) ** 0.5
        self.register_buffer("weights", weights)
        self.conv = nn.Conv2d(3, 1, 1)       # only so that the model has a spatial layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = (x[:, 0] == 0).float()
        logit = (hidden * self.weights).sum(dim=(1, 2)) + 0 * self.conv(x).sum(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def rectangle_probabilities(weights: np.ndarray, window_h: int, window_w: int) -> np.ndarray:
    """P(class 0) with a window_h x window_w rectangle hidden, for every placement: [top, left]."""
    height, width = weights.shape
    result = np.empty((height - window_h + 1, width - window_w + 1))
    for top in range(result.shape[0]):
        for left in range(result.shape[1]):
            logit = weights[top:top + window_h, left:left + window_w].sum(dtype=np.float64)
            result[top, left] = 1.0 / (1.0 + np.exp(-logit))
    return result


def assert_every_pixel_was_hidden_by_its_window(values: np.ndarray, weights: np.ndarray,
                                                window_h: int, window_w: int) -> None:
    rectangles = rectangle_probabilities(weights, window_h, window_w)
    height, width = values.shape
    for row in range(height):
        for column in range(width):
            # The rectangles that contain the pixel: top in (row - h, row], left likewise.
            covering = rectangles[max(0, row - window_h + 1):row + 1,
                                  max(0, column - window_w + 1):column + 1]
            nearest = float(np.abs(covering - values[row, column]).min())
            assert nearest < 1e-5, (f"pixel ({row}, {column}) shows {values[row, column]:.6f}, "
                                    "the probability of no window that hides it")


def run(height: int, width: int, positions: int, fraction: float) -> np.ndarray:
    module = HiddenPixelModel(height, width)
    model = wrap(module, side=height) if height == width else None
    if model is None:
        from model_adapters.loading import loaded_model_from_module

        model = loaded_model_from_module(module, architecture="hidden", input_size=(height, width),
                                         mean=(0.5,), std=(0.5,), class_names=None)
    image = torch.ones(1, 3, height, width)             # nothing equals the fill until hidden
    result = PARTIAL.run(model, image, [0], {"positions": positions, "window_fraction": fraction,
                                             "top_k": 1})
    return result.panels[0].values


def test_windows_that_do_not_cover_the_image_are_refused() -> None:
    # The example: 2 positions of a 0.1 window hide 4 % of the image.
    with pytest.raises(BadParameter) as caught:
        run(32, 32, positions=2, fraction=0.1)
    assert caught.value.code == "E_BAD_PARAMETER"
    assert {"positions", "window_fraction"} <= set(caught.value.fields)
    assert "at least" in caught.value.message


def test_the_refusal_names_settings_that_are_accepted() -> None:
    import re

    with pytest.raises(BadParameter) as caught:
        run(32, 32, positions=3, fraction=0.2)
    positions = int(re.search(r"at least (\d+) positions", caught.value.message).group(1))
    fraction = float(re.search(r"fraction of at least (\d+\.\d+)", caught.value.message).group(1))
    run(32, 32, positions=positions, fraction=0.2)
    run(32, 32, positions=3, fraction=fraction)


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
@pytest.mark.parametrize("positions", [2, 3, 4, 5, 8, 13, 30])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.25, 0.34, 0.5])
def test_every_shown_value_comes_from_a_window_that_hid_the_pixel(height: int, width: int,
                                                                  positions: int,
                                                                  fraction: float) -> None:
    try:
        values = run(height, width, positions, fraction)
    except BadParameter:
        # Refused: then some pixel really is hidden by no window. Check it without the grid:
        # with p windows of side w at most p * w pixels of an axis can be hidden.
        window_h, window_w = max(1, round(fraction * height)), max(1, round(fraction * width))
        assert positions * window_h < height or positions * window_w < width
        return
    window_h, window_w = max(1, round(fraction * height)), max(1, round(fraction * width))
    weights = HiddenPixelModel(height, width).weights.numpy()
    assert_every_pixel_was_hidden_by_its_window(values, weights, window_h, window_w)


def test_the_default_settings_are_accepted_at_common_input_sizes() -> None:
    defaults = PARTIAL.parse_params({})
    from visualizations.partial_occlusion import check_coverage

    for size in [(224, 224), (299, 299), (32, 32), (384, 512), (28, 28)]:
        check_coverage(defaults, size)
