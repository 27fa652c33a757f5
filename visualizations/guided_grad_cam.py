"""Guided Grad-CAM: Grad-CAM's coarse class localization times guided backpropagation's
pixel-sharp detail.

Selvaraju et al. (2017), https://arxiv.org/abs/1610.02391, section 3.1; guided backpropagation
from Springenberg et al. (2015), https://arxiv.org/abs/1412.6806. Computed with captum's
``GuidedGradCam``; the map is the largest absolute value over colour channels.

Caveats: guided backpropagation only changes the backward pass of ``nn.ReLU`` modules (not
functional ReLUs or ReLU6); and it largely reconstructs image edges whatever the weights
(Adebayo et al. 2018, https://arxiv.org/abs/1810.03292) -- the class-specific part of this map
comes from the Grad-CAM factor. Costs two forward and backward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visualizations.base import Attribution, Panel, RunContext, TargetInfo
from visualizations.common import (as_model_input, find_layer, prepare_model, quiet_captum,
                                   to_map)
from visualizations.layer_choice import LayerVisualization, layer_param

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta


@dataclass(frozen=True)
class GuidedGradCamParams:
    layer: str | None = layer_param()


class GuidedGradCamMap(LayerVisualization):
    name = "guided_grad_cam"
    title = "Guided Grad-CAM"
    description = ("Grad-CAM's class regions multiplied by guided backpropagation: "
                   "pixel-sharp detail of what raises the class score.")
    reference = "https://arxiv.org/abs/1610.02391"
    Params = GuidedGradCamParams
    signed = False

    def cost(self, params: Any, meta: "ModelMeta") -> int:
        return 2

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: GuidedGradCamParams, context: RunContext) -> Attribution:
        from captum.attr import GuidedGradCam

        prepare_model(model)
        inputs = as_model_input(batch.detach().clone())
        layer = find_layer(model.module, params.layer)
        context.check_cancelled()
        # GuidedGradCam needs the module itself (it hooks every nn.ReLU for the guided pass);
        # captum removes those hooks in a ``finally``, and the base class checks none leak.
        guided = GuidedGradCam(model.module, layer)
        with quiet_captum():
            attributions = guided.attribute(inputs, target=target.index,
                                            interpolate_mode="bilinear")
        context.report(0.95)
        values = attributions.detach().abs().amax(dim=1)
        return Attribution((Panel(f"Guided Grad-CAM for {target.label} at {params.layer}",
                                  to_map(values), signed=False, target=target),))
