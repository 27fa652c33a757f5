"""Guided backpropagation: the input gradient, with every negative gradient zeroed where it
passes back through an activation (Springenberg et al. 2015, https://arxiv.org/abs/1412.6806).

captum's ``GuidedBackprop`` guides only ``nn.ReLU``. Many classifiers use other activation
modules -- EfficientNet-Lite and MobileNetV2 ReLU6, EfficientNet and RegNet SiLU, ConvNeXt GELU,
MobileNetV3 Hardswish -- and there its "guided" pass quietly becomes the plain gradient. Here every
module of a type in ``guided_activation_types()`` is guided the same way: the gradient with
respect to its input
(autograd's, so the activation's own derivative is kept: ReLU's x > 0, ReLU6's 0 < x < 6) is
clamped at zero. For ``nn.ReLU`` this is exactly captum's result. Gates (sigmoid, hard sigmoid
in squeeze-excitation blocks) are not activations of the feature path and are left alone.

Activations applied as functions (``F.relu`` inside ``forward``) cannot be hooked. A model with
no guided activation module at all is refused with ``E_METHOD_UNSUPPORTED``, not shown an
unguided map under a guided title.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

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


def _clamp(gradient: "torch.Tensor") -> "torch.Tensor":
    return gradient.clamp(min=0)


def _guide_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: clamp the gradient that flows back out of this activation's input.

    Out-of-place activations get a copy of their input with the hook on it, so the gradient of
    any other use of the same tensor (a residual branch) is left alone. In-place activations
    keep their input, since code may rely on the side effect; a hook registered before an
    in-place change sees the gradient of the value before it, which is the one to clamp.
    """
    import torch

    if not args or not torch.is_tensor(args[0]) or not args[0].requires_grad:
        return None     # called with keywords, or in a pass without gradients: leave it alone
    first, *rest = args
    if getattr(module, "inplace", False):
        first.register_hook(_clamp)
        return None
    guided = first.clone()
    guided.register_hook(_clamp)
    return (guided, *rest)


def require_guided_activations(module: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The activation modules to guide; E_METHOD_UNSUPPORTED when there are none."""
    activations = guided_activations(module)
    if not activations:
        raise MethodUnsupported(
            "Guided backpropagation needs activation modules (nn.ReLU, nn.ReLU6, nn.SiLU, ...); "
            "this model applies its activations as functions. Use grad_cam instead.")
    return activations


@contextlib.contextmanager
def guided(module: "torch.nn.Module") -> Iterator[None]:
    """Guide every activation module of ``module`` while the block runs; the hooks are removed
    when it ends, even on errors."""
    activations = require_guided_activations(module)
    handles = []
    try:
        for activation in activations:
            handles.append(activation.register_forward_pre_hook(_guide_input))
        yield
    finally:
        for handle in handles:
            handle.remove()


def guided_gradients(module: "torch.nn.Module", inputs: "torch.Tensor",
                     target: int) -> "torch.Tensor":
    """Guided backpropagation of the ``target`` logit to ``inputs``: same shape as ``inputs``."""
    import torch

    inputs = inputs.detach().requires_grad_(True)
    with guided(module), torch.enable_grad():
        outputs = module(inputs)
        (gradients,) = torch.autograd.grad(outputs[:, target].sum(), inputs)
    return gradients.detach()
