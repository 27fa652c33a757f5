"""Checkpoints that execute code when loaded: full pickles, TorchScript, torch.export archives.

Only loaded with ``--trust-code`` / ``CONVSCOPE_TRUST_CODE=1``; without it they are refused with
``E_CHECKPOINT_NEEDS_TRUST`` *before* anything is unpickled (the file kind is decided statically,
see :func:`model_adapters.checkpoint_file.inspect_file`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_adapters.base import LoadedModel, ModelAdapter
from model_adapters.checkpoint_file import (find_state_dict, inspect_file, read_trusted,
                                            refuse_untrusted, CODE_KINDS)
from model_adapters.config import CheckpointConfig
from model_adapters.loading import finish_checkpoint_model
from model_adapters.torchvision_builds import GENERIC_PREPROCESS


class TrustedAdapter(ModelAdapter):
    """Whole pickled modules, TorchScript and torch.export archives (opt-in only)."""

    name = "trusted"

    def claims(self, path: Path, config: Any) -> bool:
        return inspect_file(path) in CODE_KINDS

    def load(self, path: Path, config: Any, device: torch.device, *,
             trust_code: bool = False) -> LoadedModel:
        config = config or CheckpointConfig(directory=path.parent)
        if not trust_code:
            raise refuse_untrusted(path, inspect_file(path))
        obj = read_trusted(path)
        if isinstance(obj, nn.Module):
            return wrap_trusted_module(obj, path, config, device)
        # A pickled wrapper around a state_dict (e.g. with numpy scalars beside it): build the
        # model the way the directory's config says.
        state_dict = find_state_dict(obj, path.name)
        if config.model.factory is not None:
            from model_adapters.factory_adapter import load_factory_state_dict, resolve_factory

            return load_factory_state_dict(resolve_factory(config, trust_code=True), state_dict,
                                           path, config, device)
        from model_adapters.torchvision_adapter import load_torchvision_state_dict

        return load_torchvision_state_dict(state_dict, path, config, device)


def wrap_trusted_module(module: nn.Module, path: Path, config: CheckpointConfig,
                        device: torch.device) -> LoadedModel:
    """A whole module from a trusted file: its class name is the architecture; preprocessing
    comes from ``[preprocess]`` or the ImageNet defaults."""
    architecture = getattr(module, "original_name", None) or type(module).__name__
    return finish_checkpoint_model(module, architecture=str(architecture), config=config,
                                   defaults=GENERIC_PREPROCESS, path=path, device=device,
                                   adapter=TrustedAdapter.name)
