"""Regenerate demo/datasets/sample-photos/ from public-domain photos bundled with installed
packages (run once; committed). Needs scikit-image (a test extra) and matplotlib.

A small labelled set in the class-folder layout, named by the demo model's ImageNet labels, for
trying dataset mode offline: each photo and a few variants of it (mirrored, cropped,
greyscale), plus a few deliberately hard ones -- a tiny, blurred-up espresso, the cameraman and
the rocket upside down, a motion-blurred wall clock, a horse's silhouette. Each image is
downscaled so its longer side is at most 400 px and saved as JPEG quality 85. Origins and
licences: demo/datasets/SOURCES.md.

    .venv/bin/python scripts/make_demo_dataset.py
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib import cbook
from PIL import Image, ImageOps
from skimage import data

LONGER_SIDE = 400
OUT = Path(__file__).resolve().parent.parent / "demo" / "datasets" / "sample-photos"


def _photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            return Image.open(handle).convert("RGB")
    array = np.asarray(getattr(data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return Image.fromarray(array).convert("RGB")


def mirrored(image: Image.Image) -> Image.Image:
    return ImageOps.mirror(image)


def left(image: Image.Image) -> Image.Image:
    return image.crop((0, 0, round(image.width * 0.7), image.height))


def right(image: Image.Image) -> Image.Image:
    return image.crop((round(image.width * 0.3), 0, image.width, image.height))


def centre(image: Image.Image) -> Image.Image:
    return image.crop((image.width // 5, image.height // 5, image.width * 4 // 5,
                       image.height * 4 // 5))


def greyscale(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def upside_down(image: Image.Image) -> Image.Image:
    return image.rotate(180)


def tiny(image: Image.Image) -> Image.Image:
    """48 px wide, scaled back up: the detail a model needs is gone."""
    small = image.resize((48, max(8, round(48 * image.height / image.width))),
                         Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def same(image: Image.Image) -> Image.Image:
    return image


# class folder (an ImageNet label of the demo model) -> [(file stem, photo, variant)]
SET: dict[str, list[tuple[str, str, Callable[[Image.Image], Image.Image]]]] = {
    "tabby": [("chelsea", "chelsea", same), ("chelsea-mirrored", "chelsea", mirrored),
              ("chelsea-left", "chelsea", left), ("chelsea-greyscale", "chelsea", greyscale)],
    "espresso": [("coffee", "coffee", same), ("coffee-mirrored", "coffee", mirrored),
                 ("coffee-left", "coffee", left), ("coffee-right", "coffee", right),
                 ("coffee-tiny", "coffee", tiny)],
    "tripod": [("cameraman", "camera", same), ("cameraman-mirrored", "camera", mirrored),
               ("cameraman-right", "camera", right), ("cameraman-centre", "camera", centre),
               ("cameraman-upside-down", "camera", upside_down)],
    "missile": [("rocket", "rocket", same), ("rocket-mirrored", "rocket", mirrored),
                ("rocket-left", "rocket", left), ("rocket-right", "rocket", right),
                ("rocket-upside-down", "rocket", upside_down)],
    "military uniform": [("grace-hopper", "grace_hopper", same),
                         ("grace-hopper-mirrored", "grace_hopper", mirrored)],
    "wall clock": [("clock-motion-blur-left", "clock", left),
                   ("clock-motion-blur-right", "clock", right)],
    "sorrel": [("horse-silhouette", "horse", same)],
}


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    photos: dict[str, Image.Image] = {}
    for label, entries in SET.items():
        (OUT / label).mkdir(parents=True, exist_ok=True)
        for stem, name, variant in entries:
            if name not in photos:
                photos[name] = _photo(name)
            image = variant(photos[name])
            scale = LONGER_SIDE / max(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)),
                                     Image.Resampling.LANCZOS)
            image.save(OUT / label / f"{stem}.jpg", format="JPEG", quality=85, optimize=True)


if __name__ == "__main__":
    main()
