"""Guided Grad-CAM: Grad-CAM's coarse class localization times guided backpropagation's
pixel-sharp detail.

Selvaraju et al. (2017), https://arxiv.org/abs/1610.02391, section 3.1; guided backpropagation
from Springenberg et al. (2015), https://arxiv.org/abs/1412.6806. The Grad-CAM factor is
``grad_cam``'s (with ReLU, upsampled bilinearly); the guided factor is
:mod:`visualizations.guided_backprop`, which guides every activation module (ReLU6, SiLU, GELU,
... as well as ReLU; captum's ``GuidedGradCam`` guides only ``nn.ReLU``; its docstring states
the rule for non-monotone activations). The map is the largest absolute value over colour
channels. When some activations are functions in the model's ``forward`` (DenseNet), the panel
carries a note that it is only partly guided.

Caveat: guided backpropagation largely reconstructs image edges whatever the weights (Adebayo et
al. 2018, https://arxiv.org/abs/1810.03292) -- the class-specific part of this map comes from the
Grad-CAM factor. Costs two forward and backward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visualizations.base import Attribution, Panel, RunContext, TargetInfo
from visualizations.common import as_model_input, to_map
from visualizations.grad_cam import grad_cam_map
from visualizations.guided_backprop import guided_backprop, require_guided_activations
from visualizations.layer_choice import LayerVisualization, layer_label, layer_param

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
    display_clip_percentile = 99.0     # display only: outlier pixels saturate
    display_smoothed_view = True
    Params = GuidedGradCamParams
    # Version 2: Springenberg's rule max(f', 0) * max(g, 0) at every activation; pooled-tensor
    # default layer; partly-guided note.
    version = 2

    def cost(self, params: Any, meta: "ModelMeta") -> int:
        return 2

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: GuidedGradCamParams, context: RunContext) -> Attribution:
        require_guided_activations(model.module)    # refuse before spending the Grad-CAM pass
        inputs = as_model_input(batch.detach().clone())
        cam = grad_cam_map(model, inputs, target.index, params.layer, relu=True,
                           context=context)                         # (1, 1, H, W)
        context.check_cancelled()
        guided = guided_backprop(model.module, inputs, target.index)
        context.report(0.95)
        values = (guided.gradients * cam).abs().amax(dim=1)
        return Attribution((Panel(f"Guided Grad-CAM for {target.label} at "
                                  f"{layer_label(params.layer)}", to_map(values), signed=False,
                                  target=target, notes=(guided.note,) if guided.note else ()),))
