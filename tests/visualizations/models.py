"""Tiny models with known behaviour, and the synthetic "coloured square on noise" task.

Everything is built in code and small enough to run in milliseconds on one CPU thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model_adapters.base import LoadedModel
from model_adapters.loading import loaded_model_from_module

SIDE = 32
COLOURS = ((1.0, 0.1, 0.1), (0.1, 1.0, 0.1), (0.1, 0.1, 1.0))   # class = the square's colour
CLASS_NAMES = ("red", "green", "blue")


def wrap(module: nn.Module, side: int = SIDE, channels: int = 3,
         class_names: tuple[str, ...] | None = None, architecture: str = "tiny",
         device: str = "cpu") -> LoadedModel:
    """A LoadedModel around ``module`` with mean = std = 0.5 preprocessing."""
    return loaded_model_from_module(module, architecture=architecture, input_size=(side, side),
                                    mean=(0.5,), std=(0.5,), channels=channels,
                                    class_names=class_names, device=device)


class TinyCnn(nn.Module):
    """conv-relu-conv-relu-pool-conv-relu, global average pooling, one linear layer: a head
    for which CAM is exact. The last feature map is half the input side."""

    def __init__(self, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TwoLinearHead(nn.Module):
    """Convolutions, then pooling and *two* linear layers (a VGG-like head): CAM is not exact."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class FullResolutionCam(nn.Module):
    """conv-relu at full resolution, GAP, linear: the CAM needs no upsampling, so it is exact
    pixel for pixel (mean of the map + bias = logit)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


class QuadrantModel(nn.Module):
    """Looks only at the top-left quadrant: logits from its mean colour (nonlinear, so hiding
    part of the quadrant changes the probabilities)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        quadrant = x[:, :, :half, :half]
        return self.fc(torch.tanh(self.conv(quadrant)).mean(dim=(2, 3)) * 4.0)


class LinearModel(nn.Module):
    """logits = W . flatten(x) + b: its input gradient is exactly W."""

    def __init__(self, side: int = 8, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(channels * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(x, 1))


class NanModel(nn.Module):
    """Returns NaN logits for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3))) * float("nan")


class NanWhenOccluded(nn.Module):
    """Finite on natural images, NaN as soon as a pixel is exactly 0 (the occlusion fill)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyCnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        poison = (x == 0).flatten(1).any(dim=1, keepdim=True).float() * float("inf")
        return self.inner(x) + (poison - poison)  # inf - inf = NaN where poisoned, else 0


class TinyTransformer(nn.Module):
    """A miniature ViT: 8 px patches (a 4 x 4 grid on 32 x 32, row-major), a class token in
    front, LayerNorm, self-attention and a GELU MLP with residuals, and the class token's output
    into a linear head. The patch embedding has no bias, so blank image regions give all-zero
    patch tokens, also after the LayerNorm (whose bias starts at zero)."""

    def __init__(self, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, width, 8, stride=8, bias=False)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)              # (N, 16, D)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), patches], dim=1)
        normed = self.norm(tokens)                                       # (N, 17, D)
        attended, _ = self.attention(normed, normed, normed)
        tokens = tokens + attended
        tokens = tokens + self.mlp(tokens)
        return self.fc(tokens[:, 0])


# --- the synthetic task --------------------------------------------------------------------
# Classes 0-2: a red, green or blue square somewhere on the noise; class 3: noise only. The
# "noise only" class matters: with three colour classes alone, a network can call the third
# colour "neither of the others" and its maps for that class point anywhere.

NO_SQUARE = len(COLOURS)
JITTER = 0.15
SHAPE_CLASS_NAMES = CLASS_NAMES + ("none",)


@dataclass(frozen=True)
class ShapeImages:
    """Normalized images (N, 3, S, S), their classes, and each square's box (top, left, size);
    the box is None for noise-only images."""

    images: torch.Tensor
    labels: torch.Tensor
    boxes: list[tuple[int, int, int] | None]


def shape_images(count: int, seed: int, side: int = SIDE, with_empty: bool = True) -> ShapeImages:
    """A coloured square (6-9 px) at a random place on low-saturation noise; class = colour
    (or, with ``with_empty``, a quarter of the images have no square: class 3)."""
    rng = np.random.default_rng(seed)
    gray = rng.uniform(0.0, 1.0, size=(count, 1, side, side))
    jitter = rng.uniform(-JITTER, JITTER, size=(count, 3, side, side))
    pixels = np.clip(gray + jitter, 0.0, 1.0)
    labels = rng.integers(0, len(COLOURS) + (1 if with_empty else 0), size=count)
    boxes: list[tuple[int, int, int] | None] = []
    for index in range(count):
        if labels[index] == NO_SQUARE:
            boxes.append(None)
            continue
        size = int(rng.integers(6, 10))
        top, left = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        colour = np.asarray(COLOURS[labels[index]]).reshape(3, 1, 1)
        noise = rng.uniform(-0.05, 0.05, size=(3, size, size))
        pixels[index, :, top:top + size, left:left + size] = np.clip(colour + noise, 0, 1)
        boxes.append((top, left, size))
    images = torch.from_numpy(((pixels - 0.5) / 0.5).astype(np.float32))
    return ShapeImages(images, torch.from_numpy(labels), boxes)


def train_shape_model(steps: int = 300, seed: int = 0,
                      sparsity: float = 0.1) -> tuple[LoadedModel, float]:
    """Train TinyCnn on fresh synthetic batches; return it wrapped and its held-out accuracy.

    ``sparsity`` weights an L1 penalty on every ReLU output. It makes the model's features
    silent on the background noise, so the model provably uses only the square -- without it
    the units stay active everywhere and even a correct input gradient peaks in the noise
    (a fact about that model, not a bug in the method).
    """
    torch.manual_seed(seed)
    module = TinyCnn(classes=len(SHAPE_CLASS_NAMES))
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for step in range(steps):
        batch = shape_images(32, seed=10_000 + step)
        activations = batch.images
        penalty = torch.zeros(())
        for layer in module.features:
            activations = layer(activations)
            if isinstance(layer, nn.ReLU):
                penalty = penalty + activations.mean()
        logits = module.fc(torch.flatten(module.pool(activations), 1))
        loss = nn.functional.cross_entropy(logits, batch.labels) + sparsity * penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    held_out = shape_images(200, seed=1)
    with torch.no_grad():
        accuracy = float((module(held_out.images).argmax(1) == held_out.labels).float().mean())
    return wrap(module, class_names=SHAPE_CLASS_NAMES, architecture="tiny-shapes"), accuracy
