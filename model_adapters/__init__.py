"""Model adapters, one module per checkpoint family, registered explicitly here.

An adapter knows how a family of models is *built*: a configured ``factory``, else a torchvision
architecture named in the config or recognized by its keys; the first adapter that claims a file
loads it. How a file is *read* is one function for all of them
(``checkpoint_file.read_checkpoint``: weights-only, or with ``--trust-code`` a full load), and a
whole pickled module from a trusted file is wrapped by ``loading.wrap_trusted_module``, so
adapters never import each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import CheckpointUnrecognized
from model_adapters.base import LoadedModel, ModelAdapter, ModelMeta, adapter_registry
from model_adapters.factory_adapter import FactoryAdapter
from model_adapters.loading import loaded_model_from_module
from model_adapters.torchvision_adapter import TorchvisionAdapter

if TYPE_CHECKING:
    import torch

    from model_adapters.config import CheckpointConfig

for _adapter in (FactoryAdapter(), TorchvisionAdapter()):
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
