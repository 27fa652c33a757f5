"""Guided backpropagation: the input gradient, with only positive signals passed back through
every activation (Springenberg, Dosovitskiy, Brox & Riedmiller 2015, "Striving for Simplicity:
The All Convolutional Net", https://arxiv.org/abs/1412.6806, section 3.4 and figure 1).

**The rule.** For a ReLU, Springenberg et al. zero the backward signal wherever "at least one of
the entries of the top gradient or the bottom data is negative": ``R_in = [x > 0] * max(g, 0)``
with ``g`` the signal arriving from above. ``[x > 0]`` is ReLU's derivative, so we apply, at every
activation ``f``::

    R_in = max(f'(x), 0) * max(g, 0)

For monotone activations (ReLU, ReLU6, Hardtanh, LeakyReLU, ELU, Softplus: ``f' >= 0``) this is
``f'(x) * max(g, 0)`` -- Springenberg's rule with the activation's own slope, and exactly
captum's ``GuidedBackprop`` for ReLU. SiLU, GELU, Mish and Hardswish are not monotone: ``f' < 0``
below about -1.28, -0.75, -1.19 and on (-3, -1.5). No paper defines guided backpropagation for
them, so we state the argument. Guided backpropagation is defined by two properties: only
positive signals from above are passed ("what excites the unit"), and what leaves an activation
backwards is never negative. On a decreasing stretch ``f'(x) * max(g, 0)`` would send a negative
signal down, and clamping after the product (``max(f'(x) * g, 0)``, this module's previous rule)
turns a *negative* top signal into a positive one wherever ``f' < 0``. Treating the decreasing
stretch like ReLU's flat half -- the unit does not pass more of this feature upwards there --
keeps both properties, and is the only one of the three that reduces to Springenberg's rule for
ReLU without ever passing a negative top signal. Implementation: the signal arriving at an
activation's output is clamped at 0, and the signal leaving its input is clamped at 0 again
(``max(f' * max(g, 0), 0) = max(f', 0) * max(g, 0)``). Tested against hand-computed gradients
of small networks and, for ReLU networks, against captum.

captum guides only ``nn.ReLU``; many classifiers use other activation modules -- EfficientNet-Lite
and MobileNetV2 ReLU6, EfficientNet and RegNet SiLU, ConvNeXt GELU, MobileNetV3 Hardswish -- and
there its "guided" pass quietly becomes the plain gradient. Here every module of a type in
``guided_activation_types()`` is guided. Gates (sigmoid, hard sigmoid in squeeze-excitation
blocks) are not activations of the feature path and are left alone.

Activations applied as functions (``F.relu`` inside ``forward``, as torchvision's DenseNet does
after its last block) cannot be hooked: those calls are counted during the pass (with a
``TorchFunctionMode``) and reported, so the panel can say the map is only partly guided. A model
with no guided activation module at all is refused with ``E_METHOD_UNSUPPORTED``, not shown an
unguided map under a guided title.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from app.errors import MethodUnsupported

if TYPE_CHECKING:
    import torch


def guided_activation_types() -> tuple[type, ...]:
    import torch.nn as nn

    # nn.Hardtanh covers its subclass nn.ReLU6.
    return (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
            nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus)


def guided_activations(module: "torch.nn.Module") -> list["torch.nn.Module"]:
    kinds = guided_activation_types()
    return [child for child in module.modules() if isinstance(child, kinds)]


# Torch functions that are activations, by name (F.relu, torch.relu, Tensor.relu_, F.silu, ...).
FUNCTIONAL_ACTIVATIONS = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu",
    "elu_", "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "softplus",
    "prelu", "rrelu", "rrelu_"})


def _clamp(gradient: "torch.Tensor") -> "torch.Tensor":
    return gradient.clamp(min=0)


def _guide_input(module: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: clamp the signal that leaves this activation's input (``f' * g+``).

    Out-of-place activations get a copy of their input with the hook on it, so the gradient of
    any other use of the same tensor (a residual branch) is left alone. In-place activations
    keep their input, since code may rely on the side effect; a hook registered before an
    in-place change sees the gradient of the value before it, which is the one to clamp. The
    input may be passed by position or as ``input=``.
    """
    import torch

    by_keyword = not args and "input" in kwargs
    first = kwargs["input"] if by_keyword else (args[0] if args else None)
    if not torch.is_tensor(first) or not first.requires_grad:
        return None     # nothing to guide, or a pass without gradients: leave it alone
    if getattr(module, "inplace", False):
        first.register_hook(_clamp)
        return None
    guided = first.clone()
    guided.register_hook(_clamp)
    if by_keyword:
        return args, {**kwargs, "input": guided}
    return (guided, *args[1:]), kwargs


def _guide_output(_module: Any, _args: tuple[Any, ...], output: Any) -> None:
    """Forward hook: clamp the signal that arrives at this activation's output (``g+``)."""
    import torch

    if torch.is_tensor(output) and output.requires_grad:
        output.register_hook(_clamp)


class _FunctionalActivationCounter:
    """Counts activation *functions* called outside any guided module during a forward pass.

    Guided modules bracket their own calls (``F.relu`` inside ``nn.ReLU.forward``) with
    ``enter``/``leave``, so only calls made directly in some ``forward`` are counted.
    """

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        counter = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func: Callable[..., Any], types: Any,
                                   args: tuple = (), kwargs: dict | None = None) -> Any:
                name = getattr(func, "__name__", None)
                if counter.depth == 0 and name in FUNCTIONAL_ACTIVATIONS:
                    counter.calls[name.rstrip("_")] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.depth = 0
        self.calls: Counter[str] = Counter()

    def enter(self, _module: Any, _args: Any) -> None:
        self.depth += 1

    def leave(self, _module: Any, _args: Any, _output: Any) -> None:
        self.depth -= 1


def require_guided_activations(module: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The activation modules to guide; E_METHOD_UNSUPPORTED when there are none."""
    activations = guided_activations(module)
    if not activations:
        raise MethodUnsupported(
            "Guided backpropagation needs activation modules (nn.ReLU, nn.ReLU6, nn.SiLU, ...); "
            "this model applies its activations as functions. Use grad_cam instead.")
    return activations


@contextlib.contextmanager
def guided(module: "torch.nn.Module") -> Iterator[Counter[str]]:
    """Guide every activation module of ``module`` while the block runs, and count the
    activation functions called outside them (yielded: name -> calls). The hooks are removed
    when the block ends, even on errors."""
    activations = require_guided_activations(module)
    counter = _FunctionalActivationCounter()
    handles = []
    try:
        for activation in activations:
            handles.append(activation.register_forward_pre_hook(counter.enter))
            handles.append(activation.register_forward_pre_hook(_guide_input,
                                                                with_kwargs=True))
            handles.append(activation.register_forward_hook(_guide_output))
            handles.append(activation.register_forward_hook(counter.leave))
        with counter.mode:
            yield counter.calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class GuidedGradients:
    """Guided backpropagation's result: the input gradient and the activation functions that
    could not be guided (name -> calls in the pass)."""

    gradients: "torch.Tensor"
    unguided_calls: dict[str, int]

    @property
    def note(self) -> str | None:
        """A caveat for the panel when some activations were not guided."""
        if not self.unguided_calls:
            return None
        count = sum(self.unguided_calls.values())
        names = ", ".join(f"F.{name}" for name in sorted(self.unguided_calls))
        if count == 1:
            return (f"only partly guided: 1 activation in the model's forward is applied as a "
                    f"function ({names}), not a module, so the gradient passes through it "
                    "unguided")
        return (f"only partly guided: {count} activations in the model's forward are applied as "
                f"functions ({names}), not modules, so gradients pass through them unguided")


def guided_backprop(module: "torch.nn.Module", inputs: "torch.Tensor",
                    target: int) -> GuidedGradients:
    """Guided backpropagation of the ``target`` logit to ``inputs`` (gradients shaped like
    ``inputs``), with the activation functions it could not guide."""
    import torch

    inputs = inputs.detach().requires_grad_(True)
    with guided(module) as unguided, torch.enable_grad():
        outputs = module(inputs)
    (gradients,) = torch.autograd.grad(outputs[:, target].sum(), inputs)
    return GuidedGradients(gradients.detach(), dict(unguided))


def guided_gradients(module: "torch.nn.Module", inputs: "torch.Tensor",
                     target: int) -> "torch.Tensor":
    """Guided backpropagation of the ``target`` logit to ``inputs``: same shape as ``inputs``."""
    return guided_backprop(module, inputs, target).gradients
