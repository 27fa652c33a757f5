"""Tiny classifiers for the web tests, importable by name from a convscope.toml ``factory``.

``TinyNet`` is a two-conv GAP+linear CNN (every method supports it, CAM included) that runs in
well under a millisecond. ``SlowNet`` is the same with a fixed sleep per forward pass, so an
occlusion job takes long enough to be cancelled while it runs.
"""
from __future__ import annotations

import time

import torch
from torch import nn

CLASS_NAMES = ("cat", "dog", "bird", "fish")


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class SlowNet(TinyNet):
    SECONDS_PER_FORWARD = 0.03

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.SECONDS_PER_FORWARD)
        return super().forward(x)


class FlatNet(nn.Module):
    """No spatial layers at all: the CAM family cannot run on it."""

    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))
