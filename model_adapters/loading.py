"""Turn an ``nn.Module`` plus its preprocessing facts into a ``LoadedModel`` (one place for all).

Every adapter ends here -- a whole module read from a trusted file through
:func:`wrap_trusted_module`, a built one through :func:`finish_checkpoint_model` -- and tests and
other packages use :func:`loaded_model_from_module` to wrap tiny models built in code. That
function puts the module in eval mode on its device, runs the CAM probe (one forward pass, which
also checks the class count) and fills ``ModelMeta``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from app.errors import CheckpointMismatch, DeviceOOM, LabelsMismatch, ModelOutputInvalid
from model_adapters.base import LoadedModel, ModelMeta
from model_adapters.cam_layers import find_cam_layers
from model_adapters.config import CheckpointConfig
from model_adapters.labels import check_label_count, default_class_names, read_labels_file
from model_adapters.torchvision_builds import GENERIC_PREPROCESS, DefaultPreprocess

TRUSTED_ADAPTER = "trusted"     # the adapter name of modules from code-carrying files

_OOM_MESSAGE = "The device ran out of memory loading this model."


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def loaded_model_from_module(module: nn.Module, *, architecture: str,
                             input_size: tuple[int, int] | Sequence[int],
                             mean: Sequence[float], std: Sequence[float],
                             class_names: Sequence[str] | None, resize: int = 0,
                             channels: int = 3,
                             device: torch.device | str = "cpu",
                             checkpoint_file: str = "<memory>", sha256: str = "",
                             mtime: float = 0.0, adapter: str = "memory") -> LoadedModel:
    """Wrap ``module`` (returning logits) as a LoadedModel on ``device`` with CAM layers found.

    ``mean``/``std`` may have one value per channel or a single value for all channels.
    ``class_names=None`` means the defaults for the model's output width (ImageNet names for
    1000 classes, else ``class 0..N-1``).
    Raises LabelsMismatch when the model's output width differs from ``len(class_names)``, and
    ModelOutputInvalid when the output is not a ``(batch, classes)`` tensor.
    """
    device = torch.device(device)
    height, width = (int(side) for side in input_size)
    mean_t = _per_channel(mean, channels, "mean")
    std_t = _per_channel(std, channels, "std")
    try:  # copying the weights and running the probe both need device memory
        module = _to_eval(module.to(device))
    except torch.cuda.OutOfMemoryError:
        raise DeviceOOM(_OOM_MESSAGE) from None
    try:
        cam = find_cam_layers(module, (height, width), channels, device)
    except torch.cuda.OutOfMemoryError:
        raise DeviceOOM(_OOM_MESSAGE) from None
    except Exception as error:  # noqa: BLE001 -- e.g. a shape error inside the model
        raise CheckpointMismatch(
            f"The model cannot run on a {channels}x{height}x{width} input ({type(error).__name__}); "
            "check [preprocess] input_size and channels.") from None
    output = cam.output
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != 1:
        raise ModelOutputInvalid("The model does not return one row of class scores per image.")
    num_classes = int(output.shape[1])
    if class_names is None:
        class_names = default_class_names(num_classes)
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


def _to_eval(module: nn.Module) -> nn.Module:
    try:
        return module.eval()
    except NotImplementedError:  # torch.export modules keep the mode they were exported in
        return module


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    values = tuple(float(value) for value in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values for {channels} channels")
    return values


def finish_checkpoint_model(module: nn.Module, *, architecture: str, config: CheckpointConfig,
                            defaults: DefaultPreprocess, path: Path, device: torch.device,
                            adapter: str) -> LoadedModel:
    """The shared last step of every adapter: preprocessing (``[preprocess]`` over the
    architecture's defaults), labels (``[labels] file`` or ``labels.txt``), CAM probe, meta."""
    section = config.preprocess
    channels = section.channels or 3
    mean = section.mean or defaults.mean
    std = section.std or defaults.std
    if channels == 1:  # defaults are RGB statistics; a grayscale model takes their average
        mean = mean if len(mean) == 1 else (sum(mean) / len(mean),)
        std = std if len(std) == 1 else (sum(std) / len(std),)
    labels_path = config.labels_path()
    class_names = read_labels_file(labels_path) if labels_path is not None else None
    loaded = loaded_model_from_module(
        module, architecture=architecture,
        input_size=section.input_size or defaults.input_size, mean=mean, std=std,
        class_names=None, resize=section.resize if section.resize is not None else defaults.resize,
        channels=channels, device=device, checkpoint_file=path.name, mtime=_mtime(path),
        adapter=adapter)
    if class_names is not None:
        check_label_count(class_names, loaded.meta.num_classes,
                          f"The labels file {labels_path.name!r}")
        loaded.meta = dataclasses.replace(loaded.meta, class_names=class_names)
    return loaded


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def wrap_trusted_module(module: nn.Module, path: Path, config: CheckpointConfig,
                        device: torch.device) -> LoadedModel:
    """A whole module from a trusted file: its class name is the architecture; preprocessing
    comes from ``[preprocess]`` or the ImageNet defaults."""
    architecture = getattr(module, "original_name", None) or type(module).__name__
    return finish_checkpoint_model(module, architecture=str(architecture), config=config,
                                   defaults=GENERIC_PREPROCESS, path=path, device=device,
                                   adapter=TRUSTED_ADAPTER)
