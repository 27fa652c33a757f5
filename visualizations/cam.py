"""Class Activation Mapping (CAM): the final linear layer's class weights applied to the feature
maps that it sees through global average pooling.

Zhou, Khosla, Lapedriza, Oliva & Torralba (2016), "Learning Deep Features for Discriminative
Localization", https://arxiv.org/abs/1512.04150. For a head ``logits = W . mean_xy(A) + b`` the
map ``M_c(x, y) = sum_k W[c, k] A_k(x, y)`` is exact: its spatial mean plus ``b_c`` *is* the
logit. It needs no gradients -- one forward pass.

That exactness only holds for that head, so we check it on the actual forward pass: the input of
the model's last linear layer must equal the spatial mean of the chosen layer's output (or of
the same-shaped input of a pooling module after it, when a functional activation sits between),
and that linear layer's output must be the model's output. Any other head (several linear layers,
convolutional classifiers, a different layer) gets ``E_METHOD_UNSUPPORTED`` pointing to Grad-CAM,
which generalizes CAM to any head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import MethodUnsupported
from visualizations.base import Attribution, Panel, RunContext, TargetInfo
from visualizations.common import (as_model_input, captured_calls, check_finite, find_layer,
                                   to_map, upsample)
from visualizations.layer_choice import LayerVisualization, layer_param

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel

_CAM_LAYER = "\0cam_layer"  # a key no real module name can take
_NOT_GAP_LINEAR = ("CAM needs a head of global average pooling followed by one linear layer "
                   "after layer {layer!r}; this model's head is different, so use grad_cam.")


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

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: CamParams, context: RunContext) -> Attribution:
        import torch

        context.check_cancelled()
        features, head, where = cam_features(model.module, batch, params.layer)
        weights = head.weight[target.index].float()                          # (K,)
        with torch.inference_mode():
            cam = torch.einsum("k,khw->hw", weights, features[0].float())    # (h, w)
            values = upsample(cam[None, None], tuple(batch.shape[-2:]))
        return Attribution((Panel(f"CAM for {target.label} at {where}", to_map(values),
                                  signed=True, target=target),))


def cam_features(module: "torch.nn.Module", batch: "torch.Tensor",
                 layer_name: str) -> tuple["torch.Tensor", "torch.nn.Linear", str]:
    """Run the model once and return (feature maps (1, K, h, w), the linear head, a description
    of where the maps come from), after checking that ``head(mean_xy(maps))`` is the output.

    The maps are the layer's output, or -- when an elementwise activation applied outside any
    module sits between the layer and a global-average-pool module (EfficientNet-Lite's head:
    ``_bn1`` then a reused ReLU6) -- the pool's input, which has the layer's shape.
    Raises MethodUnsupported for any other head.
    """
    import torch

    layer = find_layer(module, layer_name)
    linears = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    pools = {name: m for name, m in module.named_modules()
             if isinstance(m, (torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d))}
    watched = {**linears, **pools, _CAM_LAYER: layer}
    with torch.inference_mode(), captured_calls(watched) as calls:
        logits = module(as_model_input(batch.detach()))
    check_finite(logits, "logits")
    unsupported = MethodUnsupported(_NOT_GAP_LINEAR.format(layer=layer_name))

    order = calls.order
    layer_calls = [i for i, name in enumerate(order) if name == _CAM_LAYER]
    linear_calls = [i for i, name in enumerate(order) if name in linears]
    # The head is the last linear layer run, and it must run after the CAM layer.
    if not layer_calls or not linear_calls or linear_calls[-1] < layer_calls[-1]:
        raise unsupported
    head_name = order[linear_calls[-1]]
    head_input = calls.inputs[head_name][0].reshape(-1)
    if not _close(calls.outputs[head_name], logits):
        raise unsupported

    candidates = [(calls.outputs[_CAM_LAYER], layer_name)]
    between = order[layer_calls[-1] + 1:linear_calls[-1]]
    candidates += [(calls.inputs[name][0], f"{layer_name} (as fed to {name})")
                   for name in reversed(between) if name in pools]
    reference_shape = getattr(candidates[0][0], "shape", None)
    for features, where in candidates:
        if (isinstance(features, torch.Tensor) and features.ndim == 4
                and features.shape == reference_shape
                and _close(head_input, features.float().mean(dim=(2, 3)).reshape(-1))):
            return features, linears[head_name], where
    raise unsupported
