"""The ModelAdapter interface and what every adapter produces: a LoadedModel with its ModelMeta.

An adapter knows one family of checkpoints. It decides whether it ``claims`` a file and turns it
into a ``LoadedModel``. Everything that depends only on metadata (preprocessing, prediction) lives
here, once, driven by ``ModelMeta`` -- adapters never reimplement it.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from app.errors import ModelOutputInvalid, UnknownClass
from app.registry import Registry

if TYPE_CHECKING:  # torch and PIL are heavy; import them where they are used.
    import torch
    from PIL import Image


@dataclass(frozen=True)
class ModelMeta:
    """Everything about a loaded model that travels with it (torchvision-style meta record)."""

    architecture: str
    num_classes: int
    input_size: tuple[int, int]          # (H, W) the model sees
    channels: int                        # 1 or 3
    mean: tuple[float, ...]              # one value per channel (loading.py expands them)
    std: tuple[float, ...]
    resize: int                          # shorter side before the center crop; 0 = plain resize
    class_names: tuple[str, ...]
    cam_layers: tuple[str, ...]          # modules with spatial 4-D outputs, in forward order
    default_cam_layer: str | None        # the last spatial layer before global pooling
    cam_unsupported_reason: str | None   # set (and cam_layers empty): no grid-shaped layer
    parameters: int
    checkpoint_file: str                 # file name as listed in the checkpoint directory
    sha256: str
    mtime: float
    adapter: str

    def normalization(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(mean, std)`` as float32 ``(1, C, 1, 1)`` CPU tensors, to broadcast over a batch."""
        import torch

        return (torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1),
                torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1))

    def class_index(self, target: int | str) -> int:
        """Resolve a class given by index (int or digit string) or by exact label."""
        if isinstance(target, bool):
            raise UnknownClass("A class must be an index or a label.")
        if isinstance(target, str) and target.strip().isascii() and target.strip().isdigit():
            # ASCII only: str.isdigit() also accepts e.g. "²", which int() rejects. More than
            # 18 digits is out of range anyway (and int() refuses over 4300 digits).
            digits = target.strip().lstrip("0") or "0"
            if len(digits) > 18:
                raise self._out_of_range(digits[:18] + "...")
            target = int(digits)
        if isinstance(target, int):
            if 0 <= target < self.num_classes:
                return target
            raise self._out_of_range(str(target) if abs(target) < 10 ** 18 else "(huge)")
        if isinstance(target, str):
            wanted = target.strip()
            for index, name in enumerate(self.class_names):
                if name == wanted:
                    return index
            lowered = wanted.lower()
            for index, name in enumerate(self.class_names):
                if name.lower() == lowered:
                    return index
        raise UnknownClass(f"Unknown class {str(target)[:80]!r}.",
                           fields={"target": "a class index or one of the model's labels"})

    def _out_of_range(self, shown: str) -> UnknownClass:
        return UnknownClass(f"Class index {shown} is out of range 0..{self.num_classes - 1}.",
                            fields={"target": f"0..{self.num_classes - 1}"})


@dataclass
class LoadedModel:
    """An ``nn.Module`` in eval mode on its device, returning logits, plus its metadata.

    ``lock`` serializes anything that installs hooks or needs gradients on this module, so two
    threads visualizing the same model never see each other's hooks or gradients.
    """

    module: "torch.nn.Module"
    meta: ModelMeta
    device: "torch.device"
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def model_view(self, image: "Image.Image") -> "Image.Image":
        """The picture the model actually sees: resized and center-cropped, in its channels."""
        from PIL import Image

        height, width = self.meta.input_size
        image = image.convert("L" if self.meta.channels == 1 else "RGB")
        if self.meta.resize <= 0:
            return image.resize((width, height), Image.Resampling.BILINEAR)
        scale = self.meta.resize / min(image.size)
        resized = image.resize((max(width, round(image.width * scale)),
                                max(height, round(image.height * scale))),
                               Image.Resampling.BILINEAR)
        left = (resized.width - width) // 2
        top = (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))

    def to_tensor(self, views: Sequence["Image.Image"]) -> "torch.Tensor":
        """Normalize model-view images into an (N, C, H, W) float tensor on the device."""
        import numpy as np
        import torch

        arrays = [np.asarray(view, dtype=np.float32) / 255.0 for view in views]
        batch = torch.from_numpy(np.stack(arrays))
        batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
        mean, std = self.meta.normalization()
        return ((batch - mean) / std).contiguous().to(self.device)

    def preprocess(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        """PIL images (any size) -> normalized (N, C, H, W) tensor on the model's device."""
        return self.to_tensor([self.model_view(image) for image in images])

    def predict(self, batch: "torch.Tensor") -> "torch.Tensor":
        """Class probabilities (N, num_classes) for a preprocessed batch; checks finiteness."""
        import torch

        with self.lock, torch.inference_mode():
            logits = self.module(batch.to(self.device))
        if not torch.isfinite(logits).all():
            raise ModelOutputInvalid("The model produced NaN or infinite logits for this image.")
        return torch.softmax(logits.float(), dim=1)

    def top_k(self, probabilities: "torch.Tensor", k: int = 5) -> list[dict[str, Any]]:
        """Top-k of one row of probabilities as ``[{"index", "label", "probability"}]``."""
        values, indices = probabilities.flatten().topk(min(k, self.meta.num_classes))
        return [{"index": int(i), "label": self.meta.class_names[int(i)], "probability": float(v)}
                for v, i in zip(values.tolist(), indices.tolist())]


class ModelAdapter(ABC):
    """Knows one family of checkpoints: which files it claims and how to load them."""

    name: str = ""

    @abstractmethod
    def claims(self, path: Path, config: Any) -> bool:
        """True when this adapter should load ``path`` (``config``: the directory's parsed
        ``convscope.toml``, or None). Must be cheap: no full load."""

    @abstractmethod
    def load(self, path: Path, config: Any, device: "torch.device", *,
             trust_code: bool = False) -> LoadedModel:
        """Load ``path`` as an eval-mode model on ``device``; raise ConvscopeError subclasses."""


adapter_registry: Registry[ModelAdapter] = Registry("model adapter")
