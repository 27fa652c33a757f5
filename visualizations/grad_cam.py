"""Grad-CAM: a layer's feature maps weighted by the spatial mean of the class score's gradient.

Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra (2017), "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", https://arxiv.org/abs/1610.02391. At the tensor
the head pools (the default layer) it equals CAM for a global-average-pool + linear head, up to
the factor 1 / (h * w), and it works for any head. The coarse layer map is upsampled
bilinearly to the input. With ``relu`` (the paper's choice) only evidence *for* the class is
kept; without it the map is signed.

The layer is a convolutional feature map ``(1, C, h, w)``, or a transformer's patch tokens
``(1, T, D)``: the prefix tokens (class, distillation, registers) are dropped and the rest laid
out on their grid (:func:`model_adapters.cam_layers.token_grid`), as pytorch-grad-cam's
``reshape_transform`` does for ViTs. Costs one forward and one backward pass; on feature maps
the result equals captum's ``LayerGradCam`` (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import MethodUnsupported
from visualizations.base import Attribution, Panel, RunContext, TargetInfo, param
from visualizations.common import ObservedForward, as_model_input, check_finite, to_map, upsample
from visualizations.layer_choice import (LayerVisualization, captured_layer, layer_label,
                                         layer_param)

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel


@dataclass(frozen=True)
class GradCamParams:
    layer: str | None = layer_param()
    relu: bool = param(True, label="Positive evidence only",
                       help="Keep only regions that raise the class score (ReLU), as in the "
                            "paper; off shows a signed map.")


def grad_cam_map(model: "LoadedModel", inputs: "torch.Tensor", target: int, layer_name: str,
                 relu: bool, context: RunContext) -> "torch.Tensor":
    """Grad-CAM at ``layer_name`` for one image, upsampled to the input size: (1, 1, H, W)."""
    import torch

    with torch.enable_grad():
        leaf = inputs.detach().requires_grad_(True)
        with captured_layer(model.module, layer_name) as captured:
            logits = ObservedForward(model.module, context, 1)(leaf)
        check_finite(logits, "logits")
        activations = captured.tensor
        if activations is None:
            raise MethodUnsupported(f"Layer {layer_name!r} did not produce a tensor, so "
                                    "Grad-CAM cannot use it; choose another layer.")
        if not activations.requires_grad or not logits.requires_grad:
            raise MethodUnsupported("The model computes this layer or its output without "
                                    "gradients (torch.no_grad inside forward), so Grad-CAM "
                                    "cannot run; use occlusion.")
        (gradients,) = torch.autograd.grad(logits[:, target].sum(), activations)
    size = tuple(inputs.shape[-2:])
    activations = feature_map(activations.detach(), size, layer_name)
    gradients = feature_map(gradients, size, layer_name)
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)         # one weight per channel
    coarse = (weights * activations.float()).sum(dim=1, keepdim=True)  # (1, 1, h, w)
    if relu:
        coarse = coarse.clamp(min=0)
    return upsample(coarse, size)


def feature_map(tensor: "torch.Tensor", input_size: tuple[int, int],
                layer_name: str) -> "torch.Tensor":
    """A layer output as ``(N, C, h, w)``: feature maps as they are, patch tokens on their grid."""
    from model_adapters.cam_layers import token_grid

    if tensor.ndim == 4:
        return tensor
    grid = token_grid(int(tensor.shape[1]), input_size) if tensor.ndim == 3 else None
    if grid is None:
        raise MethodUnsupported(
            f"Layer {layer_name!r} outputs shape {tuple(tensor.shape)}: neither a feature map "
            "nor patch tokens on a grid over the image; choose another layer.")
    prefix, rows, cols = grid
    patches = tensor[:, prefix:]                                       # (N, rows*cols, D)
    return patches.reshape(tensor.shape[0], rows, cols, -1).permute(0, 3, 1, 2)


class GradCamMap(LayerVisualization):
    name = "grad_cam"
    title = "Grad-CAM"
    description = ("Which regions of a convolutional layer raise the class score: its feature "
                   "maps weighted by the average gradient of the score, upsampled to the image.")
    reference = "https://arxiv.org/abs/1610.02391"
    Params = GradCamParams
    # Version 2: the default layer is the tensor the head pools (after its activation).
    version = 2

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: GradCamParams, context: RunContext) -> Attribution:
        inputs = as_model_input(batch.detach().clone())
        values = grad_cam_map(model, inputs, target.index, params.layer, params.relu, context)
        return Attribution((Panel(f"Grad-CAM for {target.label} at {layer_label(params.layer)}",
                                  to_map(values), signed=not params.relu, target=target),))
