"""Guided backpropagation guides every activation module, not only nn.ReLU, with the rule
``R_in = max(f'(x), 0) * max(g, 0)`` (see the module docstring for the argument).

Three references, each written independently of the hooks:

* hand-computed guided gradients of two- and three-layer networks in numpy, with each
  activation's derivative written out by formula (SiLU, GELU, Mish, Hardswish, where ``f' < 0``
  on part of the range, chosen so every sign combination of ``f'`` and the top signal occurs);
* captum's ``GuidedBackprop`` on the same networks with every activation swapped for ``nn.ReLU``
  (and on ReLU6 networks whose activations stay below 6, where ReLU6 is ReLU);
* for deeper networks (batch norm, in-place activations, residual-free stacks), a hook-free
  autograd.Function per activation -- the same rule through another mechanism.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.errors import MethodUnsupported
from tests.visualizations.models import TinyCnn, wrap
from visualizations import visualization_registry
from visualizations.guided_backprop import guided, guided_backprop, guided_gradients


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
            (slope,) = torch.autograd.grad(ctx.activation(leaf).sum(), leaf)
        return slope.clamp(min=0) * grad_output.clamp(min=0), None


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
            if isinstance(child, (nn.ReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Mish,
                                  nn.Hardswish)):
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
    (nn.Hardtanh, {"min_val": -1.0, "max_val": 1.0}), (nn.SiLU, {}), (nn.SiLU, {"inplace": True}),
    (nn.GELU, {}), (nn.Mish, {}), (nn.Hardswish, {}), (nn.Hardswish, {"inplace": True})])
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
    def __init__(self, keyword: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.keyword = keyword
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        features = self.conv(x)
        activated = self.act(input=features) if self.keyword else self.act(features)
        return self.fc(activated.mean(dim=(2, 3)))


def test_an_activation_called_with_keywords_is_guided_like_a_positional_call() -> None:
    inputs = torch.randn(1, 3, 16, 16) * 3
    keyword = guided_gradients(KeywordActivation(keyword=True).eval(), inputs, target=0)
    positional = guided_gradients(KeywordActivation(keyword=False).eval(), inputs, target=0)
    torch.testing.assert_close(keyword, positional)
    plain = plain_gradients(KeywordActivation(keyword=True).eval(), inputs, target=0)
    assert not torch.allclose(keyword, plain)


def test_hooks_are_removed_even_when_the_forward_fails() -> None:
    model = small_net(nn.ReLU6)
    with pytest.raises(RuntimeError):
        guided_gradients(model, torch.zeros(1, 5, 16, 16), target=0)   # wrong channel count
    assert all(not module._forward_pre_hooks for module in model.modules())


# --- hand-computed references ---------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


# Each activation's derivative, written out by formula (not autograd).
SLOPES = {
    "relu": lambda x: (x > 0).astype(float),
    "silu": lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
    "gelu": lambda x: _normal_cdf(x) + x * np.exp(-x * x / 2.0) / math.sqrt(2.0 * math.pi),
    "mish": lambda x: (np.tanh(np.log1p(np.exp(x)))
                       + x * _sigmoid(x) / np.cosh(np.log1p(np.exp(x))) ** 2),
    "hardswish": lambda x: np.where(x < -3, 0.0, np.where(x > 3, 1.0, (2.0 * x + 3.0) / 6.0)),
}
MODULES = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish,
           "hardswish": nn.Hardswish}
# Hidden pre-activations: -2 lies where every non-monotone activation decreases (f' < 0);
# 1.0 and 0.5 where all increase. The top weights' signs pair each with g < 0 and g > 0.
HIDDEN = np.array([-2.0, -2.0, 1.0, 1.0, 0.5, -2.5])
TOP_WEIGHTS = np.array([[-1.5, 2.0, -1.0, 0.7, 1.2, -0.4]])


def hand_guided(slope, hidden: np.ndarray, top_signal: np.ndarray) -> np.ndarray:
    """Springenberg's rule at one activation: max(f', 0) * max(g, 0)."""
    return np.maximum(slope(hidden), 0.0) * np.maximum(top_signal, 0.0)


def two_layer_net(name: str) -> tuple[nn.Module, torch.Tensor, np.ndarray, np.ndarray]:
    """Linear(6, 6) -> activation -> Linear(6, 1), with an input that puts the hidden units at
    HIDDEN; returns the net, that input, and the first layer's weight and bias."""
    rng = np.random.default_rng(0)
    first = rng.normal(size=(6, 6)) + 3.0 * np.eye(6)        # well conditioned
    bias = rng.normal(size=6)
    inputs = np.linalg.solve(first, HIDDEN - bias)
    net = nn.Sequential(nn.Linear(6, 6), MODULES[name](), nn.Linear(6, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(first))
        net[0].bias.copy_(torch.from_numpy(bias))
        net[2].weight.copy_(torch.from_numpy(TOP_WEIGHTS))
        net[2].bias.zero_()
    return net.eval(), torch.from_numpy(inputs)[None], first, bias


@pytest.mark.parametrize("name", sorted(SLOPES))
def test_two_layer_net_matches_the_hand_computed_rule(name: str) -> None:
    net, inputs, first, _ = two_layer_net(name)
    expected = first.T @ hand_guided(SLOPES[name], HIDDEN, TOP_WEIGHTS[0])
    ours = guided_gradients(net, inputs, target=0)[0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["silu", "gelu", "mish", "hardswish"])
def test_a_negative_top_signal_never_passes_a_decreasing_activation(name: str) -> None:
    """Unit 0 sits where f' < 0 and its top signal is negative: clamping f' * g (the old rule)
    passes f' * g > 0 there; Springenberg's rule passes nothing."""
    net, inputs, first, bias = two_layer_net(name)
    assert SLOPES[name](HIDDEN[:1])[0] < 0 and TOP_WEIGHTS[0, 0] < 0
    # Unit 0's share of the input gradient: the map without unit 0 must be the whole map.
    expected = first.T @ hand_guided(SLOPES[name], HIDDEN, TOP_WEIGHTS[0])
    ours = guided_gradients(net, inputs, target=0)[0].numpy()
    only_unit_0 = first.T[:, 0] * max(SLOPES[name](HIDDEN[:1])[0] * TOP_WEIGHTS[0, 0], 0.0)
    assert np.abs(only_unit_0).max() > 1e-3               # what the old rule would have added
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["silu", "gelu", "mish", "hardswish", "relu"])
def test_three_layer_net_chains_the_rule(name: str) -> None:
    """Two activations: the signal reaching the lower one is the guided signal from above."""
    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(size=(6, 4)), rng.normal(size=6)
    w2, b2 = rng.normal(size=(6, 6)), rng.normal(size=6)
    w3 = rng.normal(size=(2, 6))
    x = rng.normal(size=4) * 2.0
    net = nn.Sequential(nn.Linear(4, 6), MODULES[name](), nn.Linear(6, 6), MODULES[name](),
                        nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        for layer, (weight, bias) in zip(net[::2], [(w1, b1), (w2, b2), (w3, np.zeros(2))]):
            layer.weight.copy_(torch.from_numpy(weight))
            layer.bias.copy_(torch.from_numpy(bias))
    slope, forward = SLOPES[name], MODULES[name]().double()
    h1 = w1 @ x + b1
    a1 = forward(torch.from_numpy(h1)).numpy()
    h2 = w2 @ a1 + b2
    for target in (0, 1):
        r2 = hand_guided(slope, h2, w3[target])
        r1 = hand_guided(slope, h1, w2.T @ r2)
        ours = guided_gradients(net, torch.from_numpy(x)[None], target=target)[0].numpy()
        np.testing.assert_allclose(ours, w1.T @ r1, rtol=1e-9, atol=1e-12)


# --- captum on the ReLU version of the same network ----------------------------------------------

def with_relu(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every activation module replaced by nn.ReLU."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, (nn.ReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Mish, nn.Hardswish)):
                setattr(parent, name, nn.ReLU(inplace=getattr(child, "inplace", False)))
    return model


def captum_guided(model: nn.Module, inputs: torch.Tensor, target: int) -> torch.Tensor:
    from captum.attr import GuidedBackprop

    return GuidedBackprop(model).attribute(inputs.clone().requires_grad_(True), target=target)


@pytest.mark.filterwarnings("ignore:Setting backward hooks")
@pytest.mark.parametrize("activation, kwargs", [
    (nn.SiLU, {}), (nn.GELU, {}), (nn.Hardswish, {}), (nn.ReLU, {"inplace": True})])
def test_the_relu_version_of_each_network_matches_captum(activation, kwargs) -> None:
    relu_net = with_relu(small_net(activation, **kwargs))
    torch.manual_seed(1)
    inputs = torch.randn(1, 3, 16, 16) * 4
    for target in (0, 2):
        torch.testing.assert_close(guided_gradients(relu_net, inputs, target),
                                   captum_guided(relu_net, inputs, target), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.filterwarnings("ignore:Setting backward hooks")
def test_relu6_below_six_is_guided_like_captums_relu() -> None:
    """Where no activation reaches 6, ReLU6 is ReLU: the guided maps must agree."""
    model = small_net(nn.ReLU6)
    torch.manual_seed(2)
    inputs = torch.randn(1, 3, 16, 16) * 0.5
    with torch.no_grad():                       # check the premise: every ReLU6 input < 6
        first = model[1](model[0](inputs))
        second = model[3](model[2](first.clamp(0, 6)))
    assert float(first.max()) < 6 and float(second.max()) < 6
    torch.testing.assert_close(guided_gradients(model, inputs, 1),
                               captum_guided(with_relu(model), inputs, 1), rtol=1e-5, atol=1e-7)


# --- functional activations -----------------------------------------------------------------

class PartlyFunctional(nn.Module):
    """ReLU modules inside, then an F.relu in forward before the pool (DenseNet's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.features(x)).mean(dim=(2, 3)))


def test_a_partly_functional_model_is_shown_as_only_partly_guided() -> None:
    torch.manual_seed(0)
    model = wrap(PartlyFunctional())
    (panel,) = visualization_registry.get("guided_grad_cam").run(
        model, torch.randn(1, 3, 32, 32), [0], {}).panels
    assert len(panel.notes) == 1 and panel.notes[0].startswith("only partly guided")
    assert "F.relu" in panel.notes[0]


def test_densenet_is_shown_as_only_partly_guided() -> None:
    import torchvision

    torch.manual_seed(0)
    model = wrap(torchvision.models.densenet121(num_classes=3), side=64)
    (panel,) = visualization_registry.get("guided_grad_cam").run(
        model, torch.randn(1, 3, 64, 64), [0], {}).panels
    assert panel.notes and "1 activation" in panel.notes[0] and "F.relu" in panel.notes[0]


def test_a_model_with_activation_modules_only_has_no_note() -> None:
    torch.manual_seed(0)
    model = wrap(TinyCnn())
    (panel,) = visualization_registry.get("guided_grad_cam").run(
        model, torch.randn(1, 3, 32, 32), [0], {}).panels
    assert panel.notes == ()
    counted = guided_backprop(model.module, torch.randn(1, 3, 32, 32), 0)
    assert counted.unguided_calls == {} and counted.note is None
