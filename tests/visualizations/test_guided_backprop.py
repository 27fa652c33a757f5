"""Guided backpropagation guides every activation module, not only nn.ReLU.

The reference is built without hooks: each activation is swapped for a custom autograd function
whose backward is the activation's own derivative followed by clamping at zero (Springenberg et
al.'s rule). For nn.ReLU models the result must also equal captum's GuidedBackprop.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.errors import MethodUnsupported
from tests.visualizations.models import TinyCnn, wrap
from visualizations import visualization_registry
from visualizations.guided_backprop import guided, guided_gradients


class _GuidedReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, activation):
        ctx.save_for_backward(inputs)
        ctx.activation = activation
        return activation(inputs)

    @staticmethod
    def backward(ctx, grad_output):
        (inputs,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = inputs.detach().requires_grad_(True)
            (local,) = torch.autograd.grad(ctx.activation(leaf), leaf, grad_output)
        return local.clamp(min=0), None


class _Reference(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = copy.deepcopy(activation)
        if hasattr(self.activation, "inplace"):
            self.activation.inplace = False     # the reference recomputes it on a leaf

    def forward(self, inputs):
        return _GuidedReference.apply(inputs, self.activation)


def reference_guided_gradients(model: nn.Module, inputs: torch.Tensor, target: int):
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, (nn.ReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish)):
                setattr(parent, name, _Reference(child))
    leaf = inputs.detach().requires_grad_(True)
    (gradients,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
    return gradients


def small_net(activation: type[nn.Module], **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), activation(**kwargs),
        nn.Conv2d(8, 8, 3, padding=1), activation(**kwargs),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def plain_gradients(model: nn.Module, inputs: torch.Tensor, target: int) -> torch.Tensor:
    leaf = inputs.detach().requires_grad_(True)
    (gradients,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
    return gradients


@pytest.mark.parametrize("activation, kwargs", [
    (nn.ReLU, {}), (nn.ReLU, {"inplace": True}), (nn.ReLU6, {}), (nn.ReLU6, {"inplace": True}),
    (nn.Hardtanh, {"min_val": -1.0, "max_val": 1.0}), (nn.SiLU, {}), (nn.GELU, {}),
    (nn.Hardswish, {})])
def test_each_activation_is_guided_like_the_hook_free_reference(activation, kwargs) -> None:
    model = small_net(activation, **kwargs)
    torch.manual_seed(1)
    inputs = torch.randn(1, 3, 16, 16) * 4     # wide enough to reach ReLU6's upper bend
    ours = guided_gradients(model, inputs, target=2)
    reference = reference_guided_gradients(model, inputs, target=2)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    plain = plain_gradients(model, inputs, target=2)
    assert not torch.allclose(ours, plain), "guiding changed nothing: the hooks did not fire"


@pytest.mark.filterwarnings("ignore:Setting backward hooks")
def test_relu_models_match_captums_guided_backprop() -> None:
    from captum.attr import GuidedBackprop

    torch.manual_seed(0)
    model = TinyCnn().eval()
    inputs = torch.randn(1, 3, 32, 32)
    theirs = GuidedBackprop(model).attribute(inputs.clone().requires_grad_(True), target=1)
    torch.testing.assert_close(guided_gradients(model, inputs, target=1), theirs)


class FunctionalRelu(nn.Module):
    """Activations as functions only: nothing guided backpropagation could hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.forward_calls = 0

    def forward(self, x):
        self.forward_calls += 1
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


def test_a_model_without_activation_modules_is_refused_not_shown_unguided() -> None:
    model = wrap(FunctionalRelu())           # wrapping probes the layers with one forward
    calls_before = model.module.forward_calls
    with pytest.raises(MethodUnsupported) as caught:
        visualization_registry.get("guided_grad_cam").run(
            model, torch.zeros(1, 3, 32, 32), None, {}, probabilities=torch.ones(3).numpy() / 3)
    assert caught.value.code == "E_METHOD_UNSUPPORTED"
    assert "grad_cam" in caught.value.message
    assert model.module.forward_calls == calls_before, "refused after a Grad-CAM pass"


class SideEffectRelu(nn.Module):
    """Relies on an in-place activation changing its input (the return value is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        features = self.conv(x)
        self.act(features)
        return self.fc(features.mean(dim=(2, 3)))


def test_guiding_keeps_the_forward_of_in_place_activations() -> None:
    torch.manual_seed(0)
    model = SideEffectRelu().eval()
    inputs = torch.randn(1, 3, 16, 16)
    plain = model(inputs.clone().requires_grad_(True))
    with guided(model):
        hooked = model(inputs.clone().requires_grad_(True))
    torch.testing.assert_close(hooked, plain)


class KeywordActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(input=self.conv(x)).mean(dim=(2, 3)))


def test_an_activation_called_with_keywords_is_left_alone_not_crashed() -> None:
    model = KeywordActivation().eval()
    inputs = torch.randn(1, 3, 16, 16)
    gradients = guided_gradients(model, inputs, target=0)     # nothing to guide, no crash
    torch.testing.assert_close(gradients, plain_gradients(model, inputs, target=0))


def test_hooks_are_removed_even_when_the_forward_fails() -> None:
    model = small_net(nn.ReLU6)
    with pytest.raises(RuntimeError):
        guided_gradients(model, torch.zeros(1, 5, 16, 16), target=0)   # wrong channel count
    assert all(not module._forward_pre_hooks for module in model.modules())
