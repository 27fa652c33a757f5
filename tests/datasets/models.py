"""A tiny colour classifier, importable by a convscope.toml ``factory``, and the generated
"coloured image" task it is trained on in the tests.

Five classes by colour; datasets name four of them (purple is a class of the model that no
dataset folder names, so predictions of it land in the confusion matrix's "other" column).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

CLASS_NAMES = ("red", "green", "blue", "yellow", "purple")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220),
           "yellow": (230, 220, 40), "purple": (150, 40, 200)}
SIDE = 32


class ColourNet(nn.Module):
    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def colour_image(rng: np.random.Generator, colour: tuple[int, int, int], *,
                 mix: tuple[int, int, int] | None = None, amount: float = 0.0,
                 noise: float = 30.0, side: int = SIDE) -> np.ndarray:
    """An HxWx3 uint8 image of ``colour`` (blended with ``mix`` by ``amount``) plus noise."""
    base = np.asarray(colour, dtype=np.float64)
    if mix is not None:
        base = (1 - amount) * base + amount * np.asarray(mix, dtype=np.float64)
    pixels = base + rng.normal(0, noise, size=(side, side, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def train_colour_net(seed: int = 0, steps: int = 40, side: int = 12) -> ColourNet:
    """ColourNet trained on small clean images of every class (a few dozen steps of Adam; its
    global average pooling makes it work at any input size)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ColourNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        labels = rng.integers(0, len(CLASS_NAMES), size=32)
        images = np.stack([colour_image(rng, COLOURS[CLASS_NAMES[label]], side=side)
                           for label in labels])
        batch = (torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255 - 0.5) / 0.5
        loss = nn.functional.cross_entropy(model(batch), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_checkpoint_dir(directory: Path, model: nn.Module, *, factory: str = "ColourNet",
                         side: int = SIDE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "convscope.toml").write_text(
        f'[model]\nfactory = "tests.datasets.models:{factory}"\n'
        f"[preprocess]\ninput_size = [{side}, {side}]\nresize = 0\n"
        "mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n", encoding="utf-8")
    (directory / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), directory / "colour.pt")
    return directory


def write_dataset_with_mistakes(root: Path, seed: int = 1, per_class: int = 8) -> Path:
    """Four class folders of PNGs with known mistakes: each holds clean images of its colour,
    one image of another folder's colour (mislabelled: a confident failure), one purple image
    (a class no folder names: the "other" column), and blends at growing strength (from
    confidently right to a coin toss)."""
    rng = np.random.default_rng(seed)
    folders = CLASS_NAMES[:4]
    for number, label in enumerate(folders):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        colour = COLOURS[label]
        other = COLOURS[folders[(number + 1) % 4]]
        images = {f"clean-{i}": colour_image(rng, colour) for i in range(per_class)}
        images["mislabelled"] = colour_image(rng, other)
        images["purple"] = colour_image(rng, COLOURS["purple"])
        for i, amount in enumerate((0.3, 0.45, 0.5, 0.55, 0.7)):
            images[f"blend-{i}"] = colour_image(rng, colour, mix=other, amount=amount)
        for name, pixels in images.items():
            Image.fromarray(pixels).save(folder / f"{name}.png")
    return root


class SlowColourNet(ColourNet):
    """ColourNet that takes a while per batch, so an evaluation can be cancelled mid-run."""

    SECONDS_PER_FORWARD = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.SECONDS_PER_FORWARD)
        return super().forward(x)
