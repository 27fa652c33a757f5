"""State_dicts of torchvision classification models: named in ``convscope.toml`` or recognized.

With ``[model] architecture = "resnet50"`` the model is built by name; without it the
checkpoint's keys and shapes are matched against every torchvision classification architecture
(see :mod:`model_adapters.torchvision_builds`). Either way ``num_classes`` is read from the
classifier weight's shape unless the config sets it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from app.errors import CheckpointMismatch, CheckpointUnrecognized, ConfigInvalid
from model_adapters.base import LoadedModel, ModelAdapter
from model_adapters.checkpoint_file import (candidate_prefixes, check_finite, find_state_dict,
                                            fit_prefix, load_strict, read_checkpoint,
                                            strip_prefix)
from model_adapters.config import CheckpointConfig
from model_adapters.loading import finish_checkpoint_model, wrap_trusted_module
from model_adapters.torchvision_builds import (build, classification_architectures,
                                               default_preprocess, fingerprints_of, recognize)


class TorchvisionAdapter(ModelAdapter):
    """Bare or wrapped state_dicts of ``torchvision.models`` classifiers (any prefix)."""

    name = "torchvision"

    def claims(self, path: Path, config: Any) -> bool:
        return config is None or config.model.factory is None

    def load(self, path: Path, config: Any, device: torch.device, *,
             trust_code: bool = False) -> LoadedModel:
        config = config or CheckpointConfig(directory=path.parent)
        obj = read_checkpoint(path, trust_code=trust_code)
        if isinstance(obj, nn.Module):  # a full pickle, allowed by --trust-code
            return wrap_trusted_module(obj, path, config, device)
        return load_torchvision_state_dict(find_state_dict(obj, path.name), path, config, device)


def load_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor], path: Path,
                                config: CheckpointConfig, device: torch.device) -> LoadedModel:
    architecture = config.model.architecture
    if architecture is None:
        architecture, build_kwargs, fitted = _recognize(state_dict, path.name)
    else:
        build_kwargs, fitted = _fit_named(architecture, state_dict)
    num_classes = build_kwargs.pop("num_classes")
    wanted = config.model.num_classes
    if wanted is not None and wanted != num_classes:
        raise CheckpointMismatch(f"The checkpoint {path.name!r} has {num_classes} classes but "
                                 f"convscope.toml says num_classes = {wanted}.")
    check_finite(fitted, path.name)
    module = build(architecture, num_classes, **build_kwargs)
    non_persistent = {name for name, _ in module.named_buffers()} - set(module.state_dict())
    if non_persistent:  # meta tensors outside the state_dict would stay empty: build for real
        module = build(architecture, num_classes, meta=False, **build_kwargs)
    load_strict(module, fitted, path.name)
    return finish_checkpoint_model(module, architecture=architecture, config=config,
                                   defaults=default_preprocess(architecture, module), path=path,
                                   device=device, adapter=TorchvisionAdapter.name)


def _recognize(state_dict: Mapping[str, torch.Tensor], file_name: str
               ) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    for prefix in candidate_prefixes(list(state_dict)):
        stripped = strip_prefix(state_dict, prefix)
        match = recognize(stripped)
        if match is not None:
            fingerprint, kwargs = match
            return fingerprint.architecture, {**dict(fingerprint.build_kwargs), **kwargs}, stripped
    raise CheckpointUnrecognized(
        f"The checkpoint {file_name!r} does not match any torchvision classification "
        "architecture; name one (model.architecture) or a model factory (model.factory) in "
        "convscope.toml.")


def _fit_named(architecture: str, state_dict: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fit the prefix against a named architecture; on no exact match, return the closest
    variant so the strict load names the offending keys."""
    if architecture not in classification_architectures():
        raise ConfigInvalid(f"convscope.toml: 'model.architecture' {architecture[:60]!r} is not a "
                            "torchvision classification model.",
                            fields={"model.architecture": "a torchvision classification model"})
    fallback = None
    for fingerprint in fingerprints_of(architecture):
        fitted = fit_prefix(state_dict, set(fingerprint.shapes))
        kwargs = fingerprint.match(fitted)
        if kwargs is not None:
            return {**dict(fingerprint.build_kwargs), **kwargs}, fitted
        if fallback is None:
            widths = [tuple(fitted[key].shape)[0] for key in sorted(fingerprint.class_keys)
                      if key in fitted and fitted[key].dim() > 0]
            fallback = ({**dict(fingerprint.build_kwargs),
                         "num_classes": widths[0] if widths else 1000}, fitted)
    assert fallback is not None
    return fallback
