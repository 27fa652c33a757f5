"""Grad-CAM: a layer's feature maps weighted by the spatial mean of the class score's gradient.

Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra (2017), "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", https://arxiv.org/abs/1610.02391. It equals CAM
for a global-average-pool + linear head (up to a constant factor) and works for any head. The
coarse layer map is upsampled bilinearly to the input. With ``relu`` (the paper's choice) only
evidence *for* the class is kept; without it the map is signed.

Costs one forward and one backward pass (captum's ``LayerGradCam``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from visualizations.base import Attribution, Panel, RunContext, TargetInfo, param
from visualizations.common import (ObservedForward, as_model_input, find_layer, prepare_model,
                                   quiet_captum, to_map, upsample)
from visualizations.layer_choice import LayerVisualization, layer_param

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
    from captum.attr import LayerGradCam

    layer = find_layer(model.module, layer_name)
    grad_cam = LayerGradCam(ObservedForward(model.module, context, 1), layer)
    with quiet_captum():
        coarse = grad_cam.attribute(inputs, target=target, relu_attributions=relu)
    return upsample(coarse.detach().float(), tuple(inputs.shape[-2:]))


class GradCamMap(LayerVisualization):
    name = "grad_cam"
    title = "Grad-CAM"
    description = ("Which regions of a convolutional layer raise the class score: its feature "
                   "maps weighted by the average gradient of the score, upsampled to the image.")
    reference = "https://arxiv.org/abs/1610.02391"
    Params = GradCamParams
    signed = False

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: GradCamParams, context: RunContext) -> Attribution:
        prepare_model(model)
        inputs = as_model_input(batch.detach().clone())
        values = grad_cam_map(model, inputs, target.index, params.layer, params.relu, context)
        return Attribution((Panel(f"Grad-CAM for {target.label} at {params.layer}",
                                  to_map(values), signed=not params.relu, target=target),))
