"""The ``layer`` parameter shared by CAM, Grad-CAM and Guided Grad-CAM, and their base class.

Its choices come from the model (``ModelMeta.cam_layers``: modules with spatial 4-D outputs, or
a transformer's patch-token outputs, in forward order); its default is the model's last spatial
layer before global pooling (for a ViT: the input of the last attention).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from app.errors import MethodUnsupported
from visualizations.base import AUTO, Visualization, param

if TYPE_CHECKING:
    from model_adapters.base import ModelMeta


def layer_param() -> Any:
    return param(AUTO, label="Layer", choices_from="cam_layers",
                 help="The layer whose feature maps (or, in a vision transformer, patch tokens) "
                      "are weighted (default: the last one before global pooling; for a ViT, "
                      "the input of the last attention).")


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
