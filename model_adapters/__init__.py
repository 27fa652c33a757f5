"""Model adapters, one module per checkpoint family, registered explicitly here.

Order matters: the first adapter that claims a file loads it. Files that would execute code go
to ``trusted`` first (which refuses them without the opt-in); then a configured ``factory``;
everything else is a torchvision state_dict, named in the config or recognized by its keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import CheckpointUnrecognized
from model_adapters.base import LoadedModel, ModelAdapter, ModelMeta, adapter_registry
from model_adapters.factory_adapter import FactoryAdapter
from model_adapters.loading import loaded_model_from_module
from model_adapters.torchvision_adapter import TorchvisionAdapter
from model_adapters.trusted_adapter import TrustedAdapter

if TYPE_CHECKING:
    import torch

    from model_adapters.config import CheckpointConfig

for _adapter in (TrustedAdapter(), FactoryAdapter(), TorchvisionAdapter()):
    adapter_registry.register(_adapter.name, _adapter)


def load_checkpoint(path: Path, config: "CheckpointConfig | None", device: "torch.device", *,
                    trust_code: bool = False) -> LoadedModel:
    """Load ``path`` with the first adapter that claims it."""
    for adapter in adapter_registry:
        if adapter.claims(path, config):
            return adapter.load(path, config, device, trust_code=trust_code)
    raise CheckpointUnrecognized(f"No model adapter recognizes {path.name!r}.")


__all__ = ["LoadedModel", "ModelAdapter", "ModelMeta", "adapter_registry", "load_checkpoint",
           "loaded_model_from_module"]
