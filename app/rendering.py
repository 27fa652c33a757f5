"""Turn visualization panels into pictures: colormaps, overlays, PNG bytes, legends.

Pure functions, no Flask and no pyplot state: matplotlib is used only for its colormap lookup
tables (``matplotlib.colormaps[name]``), sampled once into a 256-entry uint8 table; colouring a
map is then one numpy ``take``, and PIL encodes the PNG (about 7x faster than pyplot's
``imsave``/``savefig`` and safe to call from many threads).

Unsigned maps use a perceptual sequential colormap (inferno: dark = low, bright = high).
Signed maps use a diverging colormap centred at 0 (RdBu_r: blue < 0 < red, white at 0), scaled
symmetrically by the largest magnitude so the colour of 0 never moves.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from visualizations.base import Panel

UNSIGNED_COLORMAP = "inferno"
SIGNED_COLORMAP = "RdBu_r"
OVERLAY_OPACITY = 0.5           # of the map over the picture, in stored and reported overlays


@dataclass(frozen=True)
class RenderedPanel:
    """A panel ready for HTML: the heatmap and the overlay as PNG bytes, and the value range
    the colours span (for the legend)."""

    heatmap_png: bytes
    overlay_png: bytes
    value_range: tuple[float, float]


@functools.lru_cache(maxsize=8)
def colormap_table(name: str) -> np.ndarray:
    """The colormap as a read-only uint8 (256, 3) lookup table."""
    import matplotlib

    colors = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    table = np.round(colors * 255.0).astype(np.uint8)
    table.setflags(write=False)
    return table


def _colormap_name(signed: bool) -> str:
    return SIGNED_COLORMAP if signed else UNSIGNED_COLORMAP


def normalize(values: np.ndarray, signed: bool,
              value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map values to [0, 1] for a colormap.

    Unsigned: ``value_range`` (default min..max) goes to 0..1. Signed: 0 goes to 0.5 and the
    largest magnitude (default ``max |values|``, or the larger end of ``value_range``) to 0/1.
    A constant map becomes all 0 (unsigned) or all 0.5 (signed) instead of dividing by zero.
    Non-finite values are an error upstream; here they are treated as 0 to stay total.
    """
    array = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0,
                          neginf=0.0)
    if signed:
        if value_range is None:
            bound = float(np.abs(array).max()) if array.size else 0.0
        else:
            bound = max(abs(float(value_range[0])), abs(float(value_range[1])))
        if bound <= 0.0:
            return np.full(array.shape, 0.5, dtype=np.float32)
        return np.clip(0.5 + 0.5 * array / bound, 0.0, 1.0)
    low, high = ((float(array.min()), float(array.max())) if value_range is None
                 else (float(value_range[0]), float(value_range[1])))
    if not high > low:
        return np.zeros(array.shape, dtype=np.float32)
    return np.clip((array - low) / (high - low), 0.0, 1.0)


def colorize(values: np.ndarray, signed: bool,
             value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A float (H, W) map as uint8 (H, W, 3) RGB through the unsigned or signed colormap."""
    unit = normalize(values, signed, value_range)
    indices = np.round(unit * 255.0).astype(np.intp)
    return colormap_table(_colormap_name(signed))[indices]


def overlay(model_view: Image.Image, heat_rgb: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """Blend the coloured map over the picture the model saw (resized to the map if needed)."""
    opacity = min(1.0, max(0.0, float(opacity)))
    heat = np.asarray(heat_rgb, dtype=np.float32)
    height, width = heat.shape[:2]
    base = model_view.convert("RGB")
    if base.size != (width, height):
        base = base.resize((width, height), Image.Resampling.BILINEAR)
    blended = (1.0 - opacity) * np.asarray(base, dtype=np.float32) + opacity * heat
    return Image.fromarray(np.round(blended).clip(0, 255).astype(np.uint8), "RGB")


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or a uint8 (H, W[, 3]) array (fast compression level)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def legend_stops(signed: bool, n: int = 11) -> list[str]:
    """``n`` evenly spaced colours of the colormap as ``#rrggbb``, low to high, for a CSS
    ``linear-gradient`` legend (its ends are labelled with the panel's value range)."""
    n = max(2, int(n))
    table = colormap_table(_colormap_name(signed))
    indices = np.round(np.linspace(0, 255, n)).astype(int)
    return ["#%02x%02x%02x" % tuple(int(c) for c in table[i]) for i in indices]


def render_panel(panel: "Panel", model_view: Image.Image, opacity: float = 0.5) -> RenderedPanel:
    """Both pictures of a panel. Heatmaps are coloured with their value range; image panels
    (e.g. the occlusion grid) are shown as they are, in both slots."""
    if panel.kind != "heatmap":
        png = encode_png(np.asarray(panel.values, dtype=np.uint8))
        return RenderedPanel(png, png, panel.value_range)
    value_range = panel.value_range
    heat = colorize(panel.values, panel.signed, value_range)
    return RenderedPanel(encode_png(heat), encode_png(overlay(model_view, heat, opacity)),
                         value_range)
