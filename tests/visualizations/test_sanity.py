"""Cascading randomization sanity check: similarity measures against scipy/scikit-image, the
verdicts on a trained model (model-sensitive maps pass, an image-only map fails), grouping of
real architectures into steps, re-initialization, and the check's contract."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from app.errors import Cancelled, MethodUnsupported
from model_adapters.base import LoadedModel
from tests.visualizations.conftest import record
from tests.visualizations.models import shape_images, wrap
from visualizations import visualization_registry
from visualizations.base import Attribution, Panel, RunContext, Visualization
from visualizations.randomization import (MAX_STEPS, RandomizationStep, randomization_steps,
                                          reinitialize)
from visualizations.sanity import SPEARMAN_THRESHOLD, sanity_check, sanity_cost
from visualizations.similarity import normalized, spearman, ssim


@dataclass(frozen=True)
class NoParams:
    pass


class ImageEdges(Visualization):
    """A 'method' that ignores the model: the gradient magnitude of the image (an edge
    detector, Adebayo et al.'s model-free comparison). Not registered."""

    name = "image_edges"
    title = "Image edges"
    description = "Gradient magnitude of the input image; uses no model."
    reference = "https://arxiv.org/abs/1810.03292"
    Params = NoParams

    def compute(self, model, batch, target, params, context) -> Attribution:
        image = batch[0].detach().float().cpu().numpy().mean(axis=0)
        rows, columns = np.gradient(image)
        return Attribution((Panel("edges", np.hypot(rows, columns).astype(np.float32),
                                  target=target),))


@pytest.fixture(scope="module")
def shape_batches() -> list[torch.Tensor]:
    return [image[None] for image in shape_images(6, seed=3, with_empty=False).images]


# --- similarity measures against independent implementations ---------------------------------

@pytest.mark.parametrize("shape", [(32, 32), (17, 40), (224, 224)])
def test_spearman_matches_scipy_with_ties(shape) -> None:
    rng = np.random.default_rng(shape[0])
    first = rng.random(shape)
    second = first + rng.normal(0, 0.5, shape)
    first = np.round(first, 1)                   # many ties
    second[: shape[0] // 3] = 0.0                 # a block of equal values
    expected = spearmanr(first.ravel(), second.ravel()).statistic
    assert spearman(first, second) == pytest.approx(expected, abs=1e-12)
    assert spearman(first, first) == pytest.approx(1.0)
    assert spearman(first, -first) == pytest.approx(-1.0)


def test_spearman_of_a_constant_map_is_zero() -> None:
    assert spearman(np.zeros((8, 8)), np.random.default_rng(0).random((8, 8))) == 0.0


@pytest.mark.parametrize("shape", [(32, 32), (20, 45), (224, 224)])
def test_ssim_matches_scikit_image(shape) -> None:
    rng = np.random.default_rng(shape[1])
    first = normalized(rng.random(shape) ** 2)
    for second in (normalized(first + rng.normal(0, 0.2, shape)), normalized(rng.random(shape)),
                   np.zeros(shape), first):
        expected = structural_similarity(first, second, data_range=1.0)
        assert ssim(first, second) == pytest.approx(expected, abs=1e-9)


def test_ssim_of_small_maps_uses_a_smaller_window() -> None:
    rng = np.random.default_rng(5)
    first, second = rng.random((5, 6)), rng.random((5, 6))
    expected = structural_similarity(first, second, data_range=1.0, win_size=5)
    assert ssim(first, second) == pytest.approx(expected, abs=1e-9)


# --- verdicts on a trained model -----------------------------------------------------------------

def test_model_sensitive_methods_pass_and_an_image_only_map_fails(shape_model,
                                                                  shape_batches) -> None:
    verdicts = {}
    for method in (visualization_registry.get("saliency"), visualization_registry.get("grad_cam"),
                   ImageEdges()):
        result = sanity_check(shape_model, shape_batches, method, {})
        final = result.steps[-1]
        verdicts[method.name] = (result.passed, final.spearman, final.ssim)
        record(f"sanity on the shape model: {method.name}",
               f"passed={result.passed} " + ", ".join(
                   f"{step.randomized}: rho={step.spearman:.2f} ssim={step.ssim:.2f}"
                   for step in result.steps))
    assert verdicts["saliency"][0] and verdicts["saliency"][1] < 0.3
    assert verdicts["grad_cam"][0] and verdicts["grad_cam"][1] < 0.3
    passed, rank_correlation, similarity = verdicts["image_edges"]
    assert not passed and rank_correlation > 0.99 and similarity > 0.99


def test_the_callers_model_is_left_untouched(shape_model, shape_batches) -> None:
    module = shape_model.module
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    sanity_check(shape_model, shape_batches[:2], visualization_registry.get("saliency"), {})
    assert shape_model.module is module
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for m in module.modules()) == hooks_before


def test_result_record_steps_from_the_output_down(shape_model, shape_batches) -> None:
    result = sanity_check(shape_model, shape_batches[:2], visualization_registry.get("grad_cam"),
                          {"relu": True})
    record_ = result.to_dict()
    assert list(record_) == ["method", "checkpoint", "params", "images", "steps", "passed",
                             "threshold"]
    assert record_["method"] == "grad_cam" and record_["images"] == 2
    assert record_["checkpoint"] == shape_model.meta.checkpoint_file
    grad_cam = visualization_registry.get("grad_cam")
    resolved = grad_cam.resolve(grad_cam.parse_params({"relu": True}, shape_model.meta),
                                shape_model.meta)
    assert record_["params"] == dataclasses.asdict(resolved)
    assert record_["params"]["layer"] == shape_model.meta.default_cam_layer
    assert [step["randomized"] for step in record_["steps"]] == \
        ["fc", "features.5", "features.2", "features.0"]
    assert all(set(step) == {"randomized", "spearman", "ssim"} for step in record_["steps"])
    assert record_["threshold"] == SPEARMAN_THRESHOLD
    assert record_["passed"] == (record_["steps"][-1]["spearman"] < SPEARMAN_THRESHOLD)
    again = sanity_check(shape_model, shape_batches[:2], visualization_registry.get("grad_cam"),
                         {"relu": True})
    assert again.to_dict() == record_, "seeded: the same check gives the same numbers"


def test_cost_estimate_counts_every_model_evaluation(shape_model, shape_batches) -> None:
    calls = []
    handle = shape_model.module.register_forward_pre_hook(
        lambda _module, inputs: calls.append(int(inputs[0].shape[0])))
    try:   # the deep copy inherits the hook, so the copy's passes are counted too
        saliency = visualization_registry.get("saliency")
        params = saliency.parse_params({}, shape_model.meta)
        sanity_check(shape_model, shape_batches[:3], saliency, params)
    finally:
        handle.remove()
    steps = len(randomization_steps(shape_model.module, shape_batches[0]))
    assert sum(calls) == sanity_cost(saliency, params, shape_model.meta, 3, steps)
    assert sanity_cost(saliency, params, shape_model.meta, 3) >= sum(calls)


def test_progress_and_cancel(shape_model, shape_batches) -> None:
    seen: list[float] = []
    sanity_check(shape_model, shape_batches[:2], visualization_registry.get("saliency"), {},
                 RunContext(progress=seen.append))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(set(seen)) > 5
    cancel = threading.Event()

    def cancel_midway(fraction: float) -> None:
        if fraction >= 0.4:
            cancel.set()

    with pytest.raises(Cancelled):
        sanity_check(shape_model, shape_batches[:2], visualization_registry.get("saliency"), {},
                     RunContext(progress=cancel_midway, cancel_event=cancel))


# --- steps and re-initialization -----------------------------------------------------------------

def test_deep_models_are_randomized_per_block() -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).eval()
    names = [step.name for step in randomization_steps(resnet, torch.zeros(1, 3, 64, 64))]
    blocks = [f"layer{stage}.{block}" for stage, count in ((4, 3), (3, 6), (2, 4), (1, 3))
              for block in reversed(range(count))]
    assert names == ["fc", *blocks, "bn1", "conv1"]

    vit = torchvision.models.vit_b_16(weights=None).eval()
    names = [step.name for step in randomization_steps(vit, torch.zeros(1, 3, 224, 224))]
    assert names[:2] == ["heads.head", "encoder.ln"] and len(names) <= MAX_STEPS
    assert names[-3:] == ["encoder.pos_embedding", "conv_proj", "class_token"]

    everything = randomization_steps(resnet, torch.zeros(1, 3, 64, 64), max_steps=None)
    assert len(everything) == sum(1 for m in resnet.modules()
                                  if list(m.parameters(recurse=False)))
    assert everything[0].name == "fc" and everything[-1].name == "conv1"


class RegisteredBackwards(nn.Module):
    """Registers its layers in the opposite order of use, and has a layer it never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 4)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_steps_follow_the_data_flow_and_flat_models_are_merged() -> None:
    names = [step.name for step in randomization_steps(RegisteredBackwards(),
                                                       torch.zeros(1, 3, 8, 8))]
    assert names == ["unused", "head", "conv"]
    flat = nn.Sequential(*[nn.Conv2d(3, 3, 1) for _ in range(30)])
    steps = randomization_steps(flat, torch.zeros(1, 3, 4, 4))
    assert len(steps) == MAX_STEPS
    assert steps[0].name.startswith("29") and steps[-1].name.endswith("0")
    assert sorted(name for step in steps for name, _ in step.parts) == \
        sorted(str(index) for index in range(30))


class WithToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 64) * 3 + 5)
        self.attention = nn.MultiheadAttention(8, 2)
        self.norm = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 16, 3)


def test_reinitialization_uses_torch_initializers_and_a_documented_fallback() -> None:
    torch.manual_seed(0)
    model = WithToken()
    with torch.no_grad():
        for tensor in (model.norm.weight, model.norm.bias, model.norm.running_mean,
                       model.conv.weight, model.attention.out_proj.bias):
            tensor.add_(7.0)
    out_proj_bias = model.attention.out_proj.bias.detach().clone()
    token_before = model.token.detach().clone()
    for name, subtree in (("norm", True), ("conv", True), ("attention", False), ("", False)):
        reinitialize(model, RandomizationStep(name or "token", ((name, subtree),)))
    assert torch.equal(model.norm.weight, torch.ones(3))           # BatchNorm's own reset
    assert torch.equal(model.norm.bias, torch.zeros(3))
    assert torch.equal(model.norm.running_mean, torch.zeros(3))
    bound = 1 / np.sqrt(3 * 3 * 3)                                 # kaiming_uniform(a=sqrt 5)
    assert float(model.conv.weight.detach().abs().max()) <= bound
    # Only the attention's own parameters: its out_proj (a child) keeps its weights.
    assert torch.equal(model.attention.out_proj.bias, out_proj_bias)
    assert float(model.attention.in_proj_bias.detach().abs().max()) == 0.0
    # Fallback: redrawn with the trained tensor's mean and spread.
    token = model.token.detach()
    assert not torch.allclose(token, token_before)
    assert abs(float(token.mean()) - float(token_before.mean())) < 1.5
    assert abs(float(token.std()) - float(token_before.std())) < 1.0


def test_a_model_without_parameters_is_refused(tiny_image) -> None:
    model = wrap(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), class_names=None)
    with pytest.raises(MethodUnsupported):
        sanity_check(model, [tiny_image], ImageEdges(), {})


def test_loaded_model_type_is_kept(shape_model: LoadedModel, shape_batches) -> None:
    result = sanity_check(shape_model, shape_batches[:1], ImageEdges(), {}, max_steps=2)
    assert [step.randomized for step in result.steps] == ["fc", "features"]
    assert result.targets == (int(shape_model.predict(shape_batches[0]).argmax()),)
