"""Model adapters, one module per checkpoint family, registered explicitly here."""
from model_adapters.base import LoadedModel, ModelAdapter, ModelMeta, adapter_registry

__all__ = ["LoadedModel", "ModelAdapter", "ModelMeta", "adapter_registry"]
