"""The adversarial method finds the smallest L-infinity budget that flips a decision.

For a linear classifier on pixels the smallest budget has a closed form: to make class b beat
class a, every pixel moves by the budget against the sign of (w_a - w_b) (the fast gradient
sign step, FGSM), which changes the margin by budget * ||w_a - w_b||_1; so the minimum is
margin / ||w_a - w_b||_1, and no smaller budget can flip the decision. The tests compute that
bound by hand from the trained weights and check the search against it, with FGSM itself as a
second witness.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.pipeline import panel_record
from tests.visualizations.models import wrap
from visualizations import visualization_registry
from visualizations.adversarial import AdversarialParams, attack
from visualizations.base import RunContext

SIDE = 8
NAMES = ("left", "right", "middle")


def _trained_linear_model() -> nn.Module:
    """A linear classifier trained on 8x8 grey images: which third of the image is bright."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((600, 1, SIDE, SIDE), generator=generator) * 0.4 + 0.3
    labels = torch.randint(0, 3, (600,), generator=generator)
    for image, label in zip(images, labels):
        columns = {0: slice(0, 3), 1: slice(5, 8), 2: slice(3, 5)}[int(label)]
        image[:, :, columns] += 0.25
    with torch.random.fork_rng():       # the same initial weights whatever ran before
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    normalized = (images - 0.5) / 0.5
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(normalized), labels).backward()
        optimizer.step()
    accuracy = float((model(normalized).argmax(1) == labels).float().mean())
    assert accuracy > 0.9, accuracy
    return model


@pytest.fixture(scope="module")
def linear():
    module = _trained_linear_model()
    return wrap(module, side=SIDE, channels=1, class_names=NAMES), module


def _pixels(column: int) -> torch.Tensor:
    """A mid-grey image with one bright third: far from 0 and 1, so clamping never binds."""
    pixels = torch.full((1, 1, SIDE, SIDE), 0.45)
    pixels[..., {0: slice(0, 3), 1: slice(5, 8), 2: slice(3, 5)}[column]] = 0.6
    return pixels


def _closed_form_budget(module: nn.Module, pixels: torch.Tensor, original: int,
                        target: int | None) -> float:
    """The smallest budget in 0-255 units (see the module docstring). Normalization is
    (p - 0.5) / 0.5, so in pixel space the weights are doubled."""
    weights = module[1].weight.detach() * 2.0
    logits = module((pixels - 0.5) / 0.5)[0].detach()
    rivals = [target] if target is not None else [b for b in range(3) if b != original]
    budgets = []
    for rival in rivals:
        margin = float(logits[original] - logits[rival])
        budgets.append(margin / float((weights[original] - weights[rival]).abs().sum()))
    return min(budgets) * 255.0


def _fgsm_flips(module: nn.Module, pixels: torch.Tensor, original: int, rival: int,
                budget: float) -> bool:
    weights = module[1].weight.detach() * 2.0
    step = -(weights[original] - weights[rival]).sign().view_as(pixels) * budget / 255.0
    logits = module(((pixels + step).clamp(0, 1) - 0.5) / 0.5)[0]
    return int(logits.argmax()) != original


@pytest.mark.parametrize("column", [0, 1, 2])
def test_untargeted_budget_matches_the_closed_form(linear, column: int) -> None:
    model, module = linear
    pixels = _pixels(column)
    batch = (pixels - 0.5) / 0.5
    original = int(module(batch).argmax())
    assert original == column
    params = AdversarialParams(max_epsilon=64.0, steps=20, rounds=4)
    result = attack(model, batch, original, original, params, RunContext())
    bound = _closed_form_budget(module, pixels, original, None)
    resolution = params.max_epsilon / 8 ** params.rounds
    assert result.epsilon is not None
    flipped = int(result.logits.argmax())
    assert flipped != original
    # Never below the smallest possible budget; at most the resolution above the smallest
    # budget for the class it found (PGD is a local search; with nearly tied rivals it may
    # take the other one).
    towards_found = _closed_form_budget(module, pixels, original, flipped)
    assert bound - 1e-4 <= result.epsilon <= towards_found + resolution + 1e-4, \
        (result.epsilon, bound, towards_found)
    # FGSM at the found budget flips towards the same rival; just below the bound nothing can.
    assert _fgsm_flips(module, pixels, original, flipped, result.epsilon)
    assert not any(_fgsm_flips(module, pixels, original, rival, bound * 0.98)
                   for rival in range(3) if rival != original)


def test_targeted_attack_makes_the_chosen_class_win(linear) -> None:
    model, module = linear
    pixels = _pixels(0)
    batch = (pixels - 0.5) / 0.5
    params = AdversarialParams(max_epsilon=64.0, steps=20, rounds=4)
    untargeted = attack(model, batch, 0, 0, params, RunContext())
    for target in (1, 2):
        result = attack(model, batch, 0, target, params, RunContext())
        assert int(result.logits.argmax()) == target
        assert result.epsilon >= _closed_form_budget(module, pixels, 0, target) - 1e-4
        assert result.epsilon >= untargeted.epsilon - 1e-4


def test_perturbations_stay_in_the_pixel_range_and_the_budget(linear) -> None:
    """On an image at the ends of the range, the attack cannot push pixels past 0 or 1."""
    model, module = linear
    pixels = torch.zeros((1, 1, SIDE, SIDE))
    pixels[..., 0:3] = 1.0                              # saturated: white left, black rest
    batch = (pixels - 0.5) / 0.5
    original = int(module(batch).argmax())
    params = AdversarialParams(max_epsilon=64.0, steps=20, rounds=3)
    result = attack(model, batch, original, original, params, RunContext())
    perturbed = pixels + result.perturbation
    assert float(perturbed.min()) >= 0.0 and float(perturbed.max()) <= 1.0
    if result.epsilon is not None:
        assert float(result.perturbation.abs().max()) <= result.epsilon / 255.0 + 1e-6
        # Half the pixels cannot move in the helpful direction, so clamping costs budget.
        assert result.epsilon >= _closed_form_budget(module, pixels, original, None) - 1e-4


def test_no_flip_within_the_budget_is_reported_as_such(linear) -> None:
    model, module = linear
    batch = (_pixels(1) - 0.5) / 0.5
    tiny = AdversarialParams(max_epsilon=0.25, steps=5, rounds=1)
    result = attack(model, batch, 1, 1, tiny, RunContext())
    assert result.epsilon is None and float(result.perturbation.abs().max()) == 0.0


def test_the_method_records_epsilon_and_the_new_class_on_every_panel(linear) -> None:
    model, module = linear
    batch = (_pixels(2) - 0.5) / 0.5
    method = visualization_registry.get("adversarial")
    result = method.run(model, batch, ["predicted"], {"max_epsilon": 64, "steps": 20,
                                                      "rounds": 3})
    assert [panel.kind for panel in result.panels] == ["heatmap", "image", "image"]  # no CAM layer
    files: dict[str, bytes] = {}
    from PIL import Image

    view = Image.new("L", (SIDE, SIDE))
    records = [panel_record(n, panel, view, files) for n, panel in enumerate(result.panels)]
    bound = _closed_form_budget(module, _pixels(2), 2, None)
    for record in records:
        # As in the untargeted test: never below the smallest budget, at most the resolution
        # above the budget towards the class it flipped to (a nearly tied rival may win).
        towards_found = _closed_form_budget(module, _pixels(2), 2,
                                            NAMES.index(record["new_class"]["label"]))
        assert bound - 1e-4 <= record["epsilon"] <= towards_found + 64 / 8 ** 3 + 1e-4
        assert record["new_class"]["label"] in ("left", "right")
        assert 0.0 <= record["new_class"]["probability"] <= 1.0
    heatmap = result.panels[0].values
    assert heatmap.max() == pytest.approx(records[0]["epsilon"], rel=1e-3)
    assert np.all(heatmap >= 0)


def test_demo_like_models_get_grad_cam_panels_before_and_after(tiny_model, tiny_image) -> None:
    method = visualization_registry.get("adversarial")
    result = method.run(tiny_model, tiny_image, ["predicted"], {"max_epsilon": 32, "steps": 5,
                                                                "rounds": 1})
    titles = [panel.title for panel in result.panels]
    assert sum(title.startswith("Grad-CAM of the") for title in titles) == 2
