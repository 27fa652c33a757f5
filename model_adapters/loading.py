"""Turn an ``nn.Module`` plus its preprocessing facts into a ``LoadedModel`` (one place for all).

Every adapter ends here, and tests and other packages use :func:`loaded_model_from_module` to
wrap tiny models built in code. The function puts the module in eval mode on its device, runs
the CAM probe (one forward pass, which also checks the class count) and fills ``ModelMeta``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from app.errors import LabelsMismatch, ModelOutputInvalid
from model_adapters.base import LoadedModel, ModelMeta
from model_adapters.cam_layers import find_cam_layers


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def loaded_model_from_module(module: nn.Module, *, architecture: str,
                             input_size: tuple[int, int] | Sequence[int],
                             mean: Sequence[float], std: Sequence[float],
                             class_names: Sequence[str], resize: int = 0, channels: int = 3,
                             device: torch.device | str = "cpu",
                             checkpoint_file: str = "<memory>", sha256: str = "",
                             mtime: float = 0.0, adapter: str = "memory") -> LoadedModel:
    """Wrap ``module`` (returning logits) as a LoadedModel on ``device`` with CAM layers found.

    ``mean``/``std`` may have one value per channel or a single value for all channels.
    Raises LabelsMismatch when the model's output width differs from ``len(class_names)``, and
    ModelOutputInvalid when the output is not a ``(batch, classes)`` tensor.
    """
    device = torch.device(device)
    height, width = (int(side) for side in input_size)
    mean_t = _per_channel(mean, channels, "mean")
    std_t = _per_channel(std, channels, "std")
    module = module.to(device).eval()
    cam = find_cam_layers(module, (height, width), channels, device)
    output = cam.output
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != 1:
        raise ModelOutputInvalid("The model does not return one row of class scores per image.")
    num_classes = int(output.shape[1])
    if len(class_names) != num_classes:
        raise LabelsMismatch(f"The model has {num_classes} outputs but {len(class_names)} class "
                             "names were given.")
    meta = ModelMeta(
        architecture=architecture, num_classes=num_classes, input_size=(height, width),
        channels=channels, mean=mean_t, std=std_t, resize=int(resize),
        class_names=tuple(str(name) for name in class_names), cam_layers=cam.layers,
        default_cam_layer=cam.default, cam_unsupported_reason=cam.unsupported_reason,
        parameters=count_parameters(module), checkpoint_file=checkpoint_file, sha256=sha256,
        mtime=float(mtime), adapter=adapter)
    return LoadedModel(module=module, meta=meta, device=device)


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    values = tuple(float(value) for value in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values for {channels} channels")
    return values
