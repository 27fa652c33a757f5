"""Regenerate demo/images/ from photos bundled with installed packages (run once; committed).

Needs scikit-image (a test extra) and matplotlib. Each photo is downscaled so its longer side
is at most 512 px and saved as JPEG quality 90. Origins and licences: demo/images/SOURCES.md.

    .venv/bin/python scripts/make_demo_images.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image
from skimage import data

LONGER_SIDE = 512
OUT = Path(__file__).resolve().parent.parent / "demo" / "images"


def sources() -> dict[str, Image.Image]:
    photos = {name: Image.fromarray(np.asarray(getattr(data, name)()))
              for name in ("chelsea", "coffee", "astronaut", "rocket")}
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = Image.open(handle).convert("RGB")
    return photos


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, image in sources().items():
        image = image.convert("RGB")
        scale = LONGER_SIDE / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)),
                                 Image.Resampling.LANCZOS)
        image.save(OUT / f"{name}.jpg", format="JPEG", quality=90, optimize=True)


if __name__ == "__main__":
    main()
