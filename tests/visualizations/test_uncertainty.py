"""How far to believe a prediction (issue 16): entropy, test-time augmentation, MC dropout and
the out-of-distribution hint, each against an independent expectation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from app.uncertainty import (TTA_VIEWS, augmented_views, entropy_figures, mc_dropout,
                             reference_energies, uncertainty)
from tests.visualizations.models import wrap

SIDE = 32


@pytest.fixture(scope="module")
def demo_model():
    from app.catalog import ModelCatalog, demo_directory

    catalog = ModelCatalog(demo_directory(), torch.device("cpu"), settle_seconds=0.0)
    return catalog.load(catalog.get("latest").id)


class MaxPoolOfPixels(nn.Module):
    """Per-pixel linear features, then the maximum over the image: invariant by construction to
    flips, shifts and zooms that keep every colour of a blocky image somewhere in view (and
    interpolation only mixes colours, which never raises a linear feature's maximum)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        self.pool = nn.AdaptiveMaxPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class PositionalLinear(nn.Module):
    """A linear layer over the flattened pixels: every position has its own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * SIDE * SIDE, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def _blocky_image() -> torch.Tensor:
    """Four flat colour quadrants (every colour also fills the image's centre), normalized."""
    pixels = torch.zeros((1, 3, SIDE, SIDE))
    half = SIDE // 2
    colours = ((0.9, 0.1, 0.2), (0.1, 0.8, 0.3), (0.2, 0.3, 0.9), (0.7, 0.7, 0.1))
    for (rows, cols), colour in zip(((slice(0, half), slice(0, half)),
                                     (slice(0, half), slice(half, SIDE)),
                                     (slice(half, SIDE), slice(0, half)),
                                     (slice(half, SIDE), slice(half, SIDE))), colours):
        pixels[0, :, rows, cols] = torch.tensor(colour).view(3, 1, 1)
    return (pixels - 0.5) / 0.5


def _figures(module: nn.Module) -> dict:
    torch.manual_seed(0)
    model = wrap(module, side=SIDE, class_names=("a", "b", "c", "d"))
    batch = _blocky_image()
    probabilities = model.predict(batch)[0].numpy()
    return uncertainty(model, batch, probabilities)


def test_tta_spread_is_zero_for_an_invariant_model_and_not_for_a_positional_one() -> None:
    invariant = _figures(MaxPoolOfPixels())["tta"]
    assert invariant["samples"] == len(TTA_VIEWS) == 8
    assert invariant["top1_agreement"] == 1.0 and invariant["top1_changed"] is False
    assert all(entry["std"] < 1e-6 for entry in invariant["classes"]), invariant
    positional = _figures(PositionalLinear())["tta"]
    assert max(entry["std"] for entry in positional["classes"]) > 1e-3, positional


def test_the_views_are_the_documented_transformations() -> None:
    batch = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)[:1]
    views = dict(augmented_views(batch))
    assert list(views) == list(TTA_VIEWS)
    assert all(view.shape == batch.shape for view in views.values())
    assert torch.equal(views["flip"], batch.flip(-1))
    # A 4 % shift of a 10 px side is 1 px (reflect-padded at the edge it leaves).
    assert torch.equal(views["shift right"][..., :, 1:], batch[..., :, :-1])
    assert torch.equal(views["shift up"][..., :-1, :], batch[..., 1:, :])


def test_entropy_matches_a_hand_computation() -> None:
    assert entropy_figures(np.full(4, 0.25))["normalized"] == pytest.approx(1.0)
    assert entropy_figures(np.array([1.0, 0.0, 0.0]))["value"] == pytest.approx(0.0, abs=1e-6)
    figures = entropy_figures(np.array([0.5, 0.25, 0.25]))
    assert figures["value"] == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)),
                                             abs=1e-4)


def test_mc_dropout_is_skipped_without_dropout_and_samples_with_it() -> None:
    model = wrap(MaxPoolOfPixels(), side=SIDE, class_names=("a", "b", "c", "d"))
    skipped = mc_dropout(model, _blocky_image(), [0, 1, 2])
    assert skipped["available"] is False and "no dropout" in skipped["reason"]

    torch.manual_seed(0)
    with_dropout = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 32), nn.ReLU(),
                                 nn.Dropout(0.5), nn.Linear(32, 4))
    model = wrap(with_dropout, side=SIDE, class_names=("a", "b", "c", "d"))
    sampled = mc_dropout(model, _blocky_image(), [0, 1, 2])
    assert sampled["available"] is True and sampled["samples"] == 8
    assert max(entry["std"] for entry in sampled["classes"]) > 1e-3
    assert not any(layer.training for layer in with_dropout.modules()), "left in training mode"
    # Back in eval mode, the prediction is deterministic again.
    batch = _blocky_image()
    assert torch.equal(model.predict(batch), model.predict(batch))


@pytest.mark.slow
def test_the_ood_hint_on_the_demo_model_photos_versus_synthetic_images(demo_model) -> None:
    """On the demo, the bundled photos are not flagged unusual and most look typical, while
    synthetic images the references never saw (other seeds and kinds) never look typical."""
    images = sorted((Path(__file__).resolve().parents[2] / "demo" / "images").glob("*.jpg"))
    flags = []
    for path in images:
        batch = demo_model.preprocess([Image.open(path).convert("RGB")])
        probabilities = demo_model.predict(batch)[0].numpy()
        flags.append(uncertainty(demo_model, batch, probabilities)["ood"]["flag"])
    assert "unusual" not in flags and flags.count("typical") >= 3, flags

    references = reference_energies(demo_model)
    generator = torch.Generator().manual_seed(123)
    mean, std = demo_model.meta.normalization()
    height, width = demo_model.meta.input_size
    unseen = [torch.rand((3, height, width), generator=generator),
              (0.3 + 0.1 * torch.randn((3, height, width), generator=generator)).clamp(0, 1),
              torch.full((3, height, width), 0.25),
              (torch.arange(width) // 8 % 2).float().view(1, 1, -1).expand(3, height, width)]
    with torch.inference_mode():
        energies = -torch.logsumexp(demo_model.module((torch.stack(unseen) - mean) / std), 1)
    assert all(float(energy) >= min(references) for energy in energies), (energies, references)
