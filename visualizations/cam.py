"""Class Activation Mapping (CAM): the final linear layer's class weights applied to the feature
maps that it sees through global average pooling.

Zhou, Khosla, Lapedriza, Oliva & Torralba (2016), "Learning Deep Features for Discriminative
Localization", https://arxiv.org/abs/1512.04150. For a head ``logits = W . mean_xy(A) + b`` the
map ``M_c(x, y) = sum_k W[c, k] A_k(x, y)`` is exact: its spatial mean plus ``b_c`` *is* the
logit. It needs no gradients -- one forward pass.

That exactness only holds for that head and for the tensor it pools, so we check it on the
actual forward pass: the input of the model's last linear layer must equal the spatial mean of
the chosen layer's tensor, and that linear layer's output must be the model's output. The
default layer is that tensor (after the activation, also when the activation is a reused module
or a function: see :mod:`model_adapters.cam_layers`). Any other layer -- e.g. the batch norm in
front of the activation -- or any other head (several linear layers, convolutional classifiers)
gets ``E_METHOD_UNSUPPORTED`` pointing to Grad-CAM, which generalizes CAM to any layer and head;
CAM never silently substitutes another tensor for the layer it names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import MethodUnsupported
from visualizations.base import Attribution, Panel, RunContext, TargetInfo
from visualizations.common import as_model_input, captured_calls, check_finite, to_map, upsample
from visualizations.layer_choice import (LayerVisualization, captured_layer, layer_label,
                                         layer_param)

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel

_NOT_GAP_LINEAR = ("CAM needs a head of global average pooling followed by one linear layer "
                   "that reads the tensor of layer {layer!r}; {why}, so use grad_cam.")


@dataclass(frozen=True)
class CamParams:
    layer: str | None = layer_param()


def _close(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    import torch

    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * max(1.0, scale)))


class ClassActivationMap(LayerVisualization):
    name = "cam"
    title = "CAM"
    description = ("The class's weights of the final linear layer applied to the last feature "
                   "maps: exact for models ending in global average pooling and one linear "
                   "layer. Signed: the map's mean (plus the bias) is the class score.")
    reference = "https://arxiv.org/abs/1512.04150"
    Params = CamParams
    # Version 2: the default layer is the tensor the head pools; other layers are refused.
    version = 2

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: CamParams, context: RunContext) -> Attribution:
        import torch

        context.check_cancelled()
        features, head = cam_features(model.module, batch, params.layer,
                                      model.meta.default_cam_layer)
        weights = head.weight[target.index].float()                          # (K,)
        with torch.inference_mode():
            cam = torch.einsum("k,khw->hw", weights, features[0].float())    # (h, w)
            values = upsample(cam[None, None], tuple(batch.shape[-2:]))
        return Attribution((Panel(f"CAM for {target.label} at {layer_label(params.layer)}",
                                  to_map(values), signed=True, target=target),))


def cam_features(module: "torch.nn.Module", batch: "torch.Tensor", layer_name: str,
                 default_layer: str | None = None) -> tuple["torch.Tensor", "torch.nn.Linear"]:
    """Run the model once and return (the layer's feature maps (1, K, h, w), the linear head),
    after checking that ``head(mean_xy(maps))`` is the model's output.

    Raises MethodUnsupported when the layer is not the tensor the head pools (naming
    ``default_layer``, the one that is, when the model's head is a GAP + linear head) or when
    the head is of another kind.
    """
    import torch

    linears = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.inference_mode(), captured_layer(module, layer_name) as captured, \
            captured_calls(linears) as calls:
        logits = module(as_model_input(batch.detach()))
    check_finite(logits, "logits")

    def unsupported(why: str) -> MethodUnsupported:
        return MethodUnsupported(_NOT_GAP_LINEAR.format(layer=layer_name, why=why))

    features = captured.tensor
    if not calls.order or features is None or features.ndim != 4:
        raise unsupported("this model's head is different")
    head_name = calls.order[-1]                     # the head is the last linear layer run
    if not _close(calls.outputs[head_name], logits):
        raise unsupported("this model's head is different")
    head_input = calls.inputs[head_name][0].reshape(-1)
    if not _close(head_input, features.float().mean(dim=(2, 3)).reshape(-1)):
        if default_layer not in (None, layer_name):
            raise unsupported(f"the head pools another tensor, layer {default_layer!r}")
        raise unsupported("this model's head is different")
    return features, linears[head_name]
