"""Fixtures for the adapter tests: tiny real models and checkpoint writers."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

CPU = torch.device("cpu")
# SqueezeNet 1.1 is the smallest torchvision classifier (0.7 M parameters at 10 classes), so
# real-architecture checkpoints cost milliseconds to write and load.
SMALL_ARCHITECTURE = "squeezenet1_1"
SMALL_CLASSES = 10


def small_torchvision_model(seed: int = 0, num_classes: int = SMALL_CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(SMALL_ARCHITECTURE, weights=None, num_classes=num_classes)
    # The default init of the class conv is tiny; randomize so logits differ clearly per seed.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    return model.eval()


class TinyNet(nn.Module):
    """A custom (non-torchvision) CNN, for factory configs and full pickles."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def tiny_net(seed: int = 0, **kwargs: Any) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs).eval()


def probe_batch(size: int = 64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=generator)


def logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if model.training:  # (torch.export modules refuse .eval(); they are exported in eval mode)
        model.eval()
    with torch.no_grad():
        return model(batch)


class _Canary:
    """Unpickling this runs code that creates ``marker`` -- the payload must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def write_canary_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump({"state_dict": _Canary(marker)}, handle)


def write_canary_zip(path: Path, marker: Path) -> None:
    torch.save({"state_dict": _Canary(marker), "epoch": 1}, path)


def set_mtime(path: Path, seconds_ago: float) -> None:
    import time

    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))
