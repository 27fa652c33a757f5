"""The pointing game on real photos with hand-drawn boxes: data, mosaics, baselines, scoring.

Pointing game (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop",
https://arxiv.org/abs/1608.00507): a map *hits* when its strongest point lies on the object of
the class it was asked about. On whole photos a centre prior already wins most of the time, so
the photos are cut into tiles and laid out as 2 x 2 mosaics, and every tile's object is asked
about in turn (the "grid pointing game" of Böhle, Fritz & Schiele 2021,
https://arxiv.org/abs/2104.00032). A model-free map -- colour saturation, edges, a centre prior, a
random map -- is the same whatever the class asked about, so it can hit at most the boxes around
its one peak: about one target in four. A map that follows the model's evidence for the class
can hit all four.

The photos ship with installed packages or with convscope (``tests/data/pointing_game.json``
records each one's origin and licence, and the boxes, drawn by hand on the photos as shipped).

Run ``python -m tests.visualizations.pointing_game`` for the full table (every method's default
and variants against the baselines, on every mosaic; about an hour on one CPU thread).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data" / "pointing_game.json"
REPOSITORY = Path(__file__).resolve().parents[2]
SIDE = 224            # the mosaic: the demo model's input size
TILE = SIDE // 2
# A point within this many pixels of the box counts, as in Zhang et al.'s pointing game (15 px);
# never beyond the box's own tile, so a model-free map still hits at most one target a mosaic.
TOLERANCE_PX = 15.0


@dataclass(frozen=True)
class Target:
    """One question of the game: a class, its object's box and the box's tile, in mosaic
    pixels (left, top, right, bottom; right and bottom exclusive)."""

    name: str
    class_index: int
    box: tuple[float, float, float, float]
    tile: tuple[float, float, float, float]

    def contains(self, row: float, column: float) -> bool:
        """Whether a map's peak at (row, column) hits: within TOLERANCE_PX of the box, and
        inside the box's tile."""
        left, top, right, bottom = self.box
        tile_left, tile_top, tile_right, tile_bottom = self.tile
        if not (tile_left <= column < tile_right and tile_top <= row < tile_bottom):
            return False
        # Distance from the point to the box (0 inside), on pixel centres.
        d_column = max(left - column, 0.0, column - (right - 1))
        d_row = max(top - row, 0.0, row - (bottom - 1))
        return math.hypot(d_row, d_column) <= TOLERANCE_PX


@dataclass(frozen=True)
class Mosaic:
    name: str
    image: Image.Image            # RGB, SIDE x SIDE
    targets: tuple[Target, ...]


def load_photo(entry: dict) -> Image.Image:
    """A photo as recorded in the data file: a file in this repository, or a loader of an
    installed package (``skimage.data.camera``)."""
    if "file" in entry:
        return Image.open(REPOSITORY / entry["file"]).convert("RGB")
    module_name, _, function = entry["loader"].rpartition(".")
    import importlib

    array = getattr(importlib.import_module(module_name), function)()
    return Image.fromarray(np.asarray(array)).convert("RGB")


@lru_cache(maxsize=1)
def dataset() -> dict:
    return json.loads(DATA.read_text())


def tile(photos: dict[str, Image.Image], object_entry: dict) -> tuple[Image.Image, tuple]:
    """The object's square crop resized to a TILE x TILE tile, and its box in tile pixels."""
    left, top, right, bottom = object_entry["crop"]
    scale = TILE / (right - left)
    assert abs((bottom - top) * scale - TILE) < 1e-6, f"crop of {object_entry['name']} not square"
    picture = photos[object_entry["photo"]].crop((left, top, right, bottom))
    picture = picture.resize((TILE, TILE), Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = object_entry["box"]
    box = (max(0.0, (x0 - left) * scale), max(0.0, (y0 - top) * scale),
           min(TILE, (x1 - left) * scale), min(TILE, (y1 - top) * scale))
    return picture, box


def mosaics() -> list[Mosaic]:
    data = dataset()
    photos = {name: load_photo(entry) for name, entry in data["photos"].items()}
    objects = {entry["name"]: entry for entry in data["objects"]}
    result = []
    for layout in data["mosaics"]:
        canvas = Image.new("RGB", (SIDE, SIDE))
        targets = []
        for position, name in enumerate(layout):
            picture, (x0, y0, x1, y1) = tile(photos, objects[name])
            dx, dy = (position % 2) * TILE, (position // 2) * TILE
            canvas.paste(picture, (dx, dy))
            targets.append(Target(name, int(objects[name]["class"]),
                                  (x0 + dx, y0 + dy, x1 + dx, y1 + dy),
                                  (dx, dy, dx + TILE, dy + TILE)))
        result.append(Mosaic("-".join(layout), canvas, tuple(targets)))
    return result


# --- where a map points -----------------------------------------------------------------------

def peak(values: np.ndarray, lowest: bool = False) -> tuple[float, float]:
    """Row and column of the map's strongest point (its lowest with ``lowest``); for a plateau
    (partial occlusion's cells) the centre of the plateau's largest piece."""
    from scipy import ndimage

    signed = -values if lowest else values
    top = float(signed.max())
    plateau = signed >= top - 1e-6 * max(1.0, abs(top))
    labels, count = ndimage.label(plateau)
    if count > 1:
        sizes = ndimage.sum(plateau, labels, range(1, count + 1))
        plateau = labels == 1 + int(np.argmax(sizes))
    rows, columns = np.nonzero(plateau)
    return float(rows.mean()), float(columns.mean())


def method_map_peak(method: str, values: np.ndarray) -> tuple[float, float]:
    # Partial occlusion maps the class probability with each cell hidden: the object is where
    # hiding it takes the probability away, i.e. where the map is lowest.
    return peak(values, lowest=(method == "partial_occlusion"))


# --- model-free baselines ---------------------------------------------------------------------

def saturation_map(image: Image.Image) -> np.ndarray:
    """HSV saturation per pixel, smoothed a little (sigma 4 px) so one noisy pixel can't win."""
    from scipy import ndimage

    hsv = np.asarray(image.convert("HSV"), dtype=np.float64)
    return ndimage.gaussian_filter(hsv[:, :, 1], 4.0)


def edge_map(image: Image.Image) -> np.ndarray:
    """Sobel gradient magnitude of the gray image, smoothed (sigma 4 px)."""
    from scipy import ndimage

    gray = np.asarray(image.convert("L"), dtype=np.float64)
    magnitude = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))
    return ndimage.gaussian_filter(magnitude, 4.0)


def centre_map(image: Image.Image) -> np.ndarray:
    """A Gaussian centred on the image: peaks at the exact centre."""
    rows, columns = np.mgrid[0:image.height, 0:image.width].astype(np.float64)
    centre_row, centre_column = (image.height - 1) / 2, (image.width - 1) / 2
    return np.exp(-((rows - centre_row) ** 2 + (columns - centre_column) ** 2) / (2 * 40.0 ** 2))


def random_map(image: Image.Image, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((image.height, image.width))


BASELINES: dict[str, Callable[[Image.Image, int], np.ndarray]] = {
    "saturation": lambda image, _seed: saturation_map(image),
    "edges": lambda image, _seed: edge_map(image),
    "centre": lambda image, _seed: centre_map(image),
    "random": random_map,
}


def baseline_hits(name: str, cases: list[Mosaic]) -> tuple[int, int]:
    """(hits, targets) of a model-free map over all mosaics (one map per mosaic: it cannot
    depend on the class asked about). The centre prior's peak is the exact centre point."""
    hits = total = 0
    for number, mosaic in enumerate(cases):
        values = BASELINES[name](mosaic.image, number)
        point = ((SIDE - 1) / 2, (SIDE - 1) / 2) if name == "centre" else peak(values)
        hits += sum(target.contains(*point) for target in mosaic.targets)
        total += len(mosaic.targets)
    return hits, total


def random_expectation(cases: list[Mosaic]) -> float:
    """Expected hit rate of a uniformly random point: the share of the mosaic's pixels that
    hit, averaged over the targets."""
    rows, columns = np.mgrid[0:SIDE, 0:SIDE]
    shares = [np.vectorize(target.contains)(rows, columns).mean()
              for mosaic in cases for target in mosaic.targets]
    return float(np.mean(shares))


def method_hits(model, method: str, params: dict, cases: list[Mosaic],
                only: set[str] | None = None) -> tuple[int, int, list[str]]:
    """(hits, targets, names of the missed targets) of one method's maps; ``only`` limits the
    targets played to those object names. Each map is computed once."""
    from visualizations import visualization_registry

    visualization = visualization_registry.get(method)
    hits = total = 0
    missed = []
    for mosaic in cases:
        chosen = [target for target in mosaic.targets if only is None or target.name in only]
        if not chosen:
            continue
        batch = model.to_tensor([mosaic.image])
        result = visualization.run(model, batch, [t.class_index for t in chosen], params)
        by_class: dict[int, np.ndarray] = {}
        for panel in result.panels:        # partial occlusion: the first panel per target
            if panel.kind == "heatmap":
                by_class.setdefault(panel.target.index, panel.values)
        for target in chosen:
            hit = target.contains(*method_map_peak(method, by_class[target.class_index]))
            hits += hit
            total += 1
            if not hit:
                missed.append(f"{target.name}@{mosaic.name}")
    return hits, total, missed


def main() -> None:                                          # pragma: no cover - a report
    import torch

    from app.catalog import ModelCatalog, demo_directory

    torch.set_num_threads(1)
    catalog = ModelCatalog(demo_directory(), torch.device("cpu"), settle_seconds=0.0)
    model = catalog.load(catalog.get("latest").id)
    cases = mosaics()
    rows = []
    for name in BASELINES:
        hits, total = baseline_hits(name, cases)
        rows.append((f"baseline: {name}", hits, total, []))
    for method, params in FULL_TABLE:
        hits, total, missed = method_hits(model, method, params, cases)
        label = method + (" " + " ".join(f"{k}={v}" for k, v in params.items()) if params else "")
        rows.append((label, hits, total, missed))
        print(f"{label}: {hits}/{total}", flush=True)
    print(f"random point, expected: {random_expectation(cases):.2f}")
    for label, hits, total, missed in rows:
        print(f"| {label} | {hits}/{total} | {hits / total:.2f} | {', '.join(missed)} |")


FULL_TABLE: list[tuple[str, dict]] = [
    ("saliency", {}), ("saliency", {"smoothgrad_samples": 0}),
    ("integrated_gradients", {}),
    *[("integrated_gradients", {"baseline": baseline, "steps": 64})     # the baseline choice
      for baseline in ("mean", "blurred", "black", "noise")],
    ("occlusion", {}), ("occlusion", {"fill": "blur"}), ("partial_occlusion", {}),
    ("cam", {}), ("grad_cam", {}), ("guided_grad_cam", {}),
]

if __name__ == "__main__":
    main()
