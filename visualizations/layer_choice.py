"""The ``layer`` parameter shared by CAM, Grad-CAM and Guided Grad-CAM, and their base class.

Its choices come from the model (``ModelMeta.cam_layers``: modules with spatial 4-D outputs, or
a transformer's patch-token outputs, in forward order, and ``@pooled`` where no module outputs
the tensor the head pools); its default is the tensor the head pools (for a ViT: the input of
the last attention). See :mod:`model_adapters.cam_layers` for the rules.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

from app.errors import MethodUnsupported
from visualizations.base import AUTO, Visualization, param
from visualizations.common import find_layer

if TYPE_CHECKING:
    import torch

    from model_adapters.base import ModelMeta


def layer_param() -> Any:
    return param(AUTO, label="Layer", choices_from="cam_layers",
                 help="The layer whose feature maps (or, in a vision transformer, patch tokens) "
                      "are weighted (default: the feature map the model's head pools, after "
                      "its activation -- listed as @pooled when no single module "
                      "outputs it; for a ViT, the input of the last attention).")


def layer_label(name: str) -> str:
    """How a layer is named in panel titles."""
    from model_adapters.cam_layers import POOLED_LAYER

    return "the pooled features" if name == POOLED_LAYER else name


class CapturedLayer:
    """What :func:`captured_layer` saw: the layer's tensor (None if it never produced one)."""

    tensor: "torch.Tensor | None" = None


@contextlib.contextmanager
def captured_layer(module: "torch.nn.Module", layer_name: str) -> Iterator[CapturedLayer]:
    """Capture the tensor of ``layer_name`` during the forward passes run inside the block.

    A module's first output in the pass is kept, and later modules get a copy, so an in-place op
    after the layer (a ``ReLU(inplace=True)``, ``out += identity``) cannot change it.
    :data:`POOLED_LAYER` is the input of the head's global pooling, taken as the pooling call
    sees it (it need not be any module's output). With gradients on, the class score's gradient
    with respect to ``captured.tensor`` can be taken after the block.
    """
    import torch

    from model_adapters.cam_layers import POOLED_LAYER, PooledTensorWatch

    captured = CapturedLayer()
    if layer_name == POOLED_LAYER:
        with PooledTensorWatch(gradient=True) as watch:
            yield captured
        captured.tensor = watch.tensor
        return
    layer = find_layer(module, layer_name)

    def keep_output(_module: object, _inputs: object, output: object) -> object:
        if captured.tensor is not None or not isinstance(output, torch.Tensor):
            return None
        captured.tensor = output
        return output.clone()

    handle = layer.register_forward_hook(keep_output)
    try:
        yield captured
    finally:
        handle.remove()


def layer_support(meta: "ModelMeta") -> str | None:
    """Why CAM-style methods cannot run on this model, or None."""
    if meta.cam_unsupported_reason:
        return meta.cam_unsupported_reason
    if not meta.cam_layers:
        return "This model has no layer with spatial feature maps, so CAM methods cannot run."
    return None


def resolve_layer(params: Any, meta: "ModelMeta") -> Any:
    """Params with ``layer`` filled in from the model's default CAM layer."""
    if params.layer is not None:
        return params
    layer = meta.default_cam_layer or (meta.cam_layers[-1] if meta.cam_layers else None)
    if layer is None:
        raise MethodUnsupported(layer_support(meta) or "This model has no CAM layer.")
    return dataclasses.replace(params, layer=layer)


class LayerVisualization(Visualization):
    """A method computed at one convolutional layer (``Params`` has a ``layer`` field made with
    :func:`layer_param`): refused for models without CAM layers, default layer filled in."""

    def supports(self, meta: "ModelMeta") -> str | None:
        return layer_support(meta)

    def resolve(self, params: Any, meta: "ModelMeta") -> Any:
        return resolve_layer(params, meta)
