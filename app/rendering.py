"""Turn visualization panels into pictures: colormaps, overlays, PNG bytes, legends.

Pure functions, no Flask and no pyplot state: matplotlib is used only for its colormap lookup
tables (``matplotlib.colormaps[name]``), sampled once into a 256-entry uint8 table; colouring a
map is then one numpy ``take``, and PIL encodes the PNG (about 7x faster than pyplot's
``imsave``/``savefig`` and safe to call from many threads).

Unsigned maps use a perceptual sequential colormap (inferno: dark = low, bright = high).
Signed maps use a diverging colormap centred at 0 (RdBu_r: blue < 0 < red, white at 0), scaled
symmetrically so the colour of 0 never moves.

Display scaling (the colours only; arrays never change): gradient maps have a few outlier pixels
that would set the whole colour scale and leave everything else black (or white), so a method may
declare ``display_clip_percentile`` -- values beyond that percentile of |map| saturate, as
captum's ``visualize_image_attr(outlier_perc=...)`` and Picasso do. The panel record's
``display`` says which range the stored pictures use, in words for the legend, and carries the
ranges of the other clip choices (``CLIP_CHOICES``) so a page can re-colour a map in the browser
from its ``.npy`` without asking the server.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from visualizations.base import Panel

UNSIGNED_COLORMAP = "inferno"
SIGNED_COLORMAP = "RdBu_r"
OVERLAY_OPACITY = 0.5           # of the map over the picture, in stored and reported overlays
# Clip percentiles a page offers for every heatmap; 100 is the full range ("max").
CLIP_CHOICES = (100.0, 99.5, 99.0, 97.0)
# The smoothed-magnitude view blurs |map| with a Gaussian of this many pixels per 112 px of the
# map's shorter side (2 px at 224 px): enough to join a gradient's speckle into regions, small
# enough to keep object parts apart.
SMOOTHING_PX_PER_112 = 1.0


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


# --- display scaling ----------------------------------------------------------------------------

def full_range(values: np.ndarray, signed: bool) -> tuple[float, float]:
    """The range that spans every value: ``-max|v|..max|v|`` (signed) or ``min..max``."""
    array = _finite(values)
    if array.size == 0:
        return (0.0, 0.0)
    if signed:
        bound = float(np.abs(array).max())
        return (-bound, bound)
    return (float(array.min()), float(array.max()))


def clipped_ranges(values: np.ndarray, signed: bool, percentiles: tuple[float, ...] = CLIP_CHOICES
                   ) -> dict[float, tuple[float, float]]:
    """The colour range for each clip percentile, from one sort of the map.

    Signed: ``±`` the percentile of |map| (0 stays the middle). Unsigned: the minimum up to the
    percentile of the values. 100 is the full range. A clip at p % saturates about (100 - p) %
    of the pixels; where ties at the percentile would saturate far more (a map that is mostly
    zeros, or one plateau), the full range is used instead, so a clip never paints a large flat
    area in the top colour."""
    array = _finite(values)
    full = full_range(array, signed)
    if array.size == 0:
        return {p: full for p in percentiles}
    clipped = [p for p in percentiles if p < 100.0]
    magnitudes = np.abs(array) if signed else array
    levels = (np.percentile(magnitudes, clipped) if clipped else [])
    ranges: dict[float, tuple[float, float]] = {}
    for percentile in percentiles:
        ranges[percentile] = full
    for percentile, level in zip(clipped, levels):
        level = float(level)
        saturated = np.count_nonzero(magnitudes >= level) / magnitudes.size
        if saturated > (100.0 - percentile) / 100.0 + 0.01:
            continue
        if signed and level > 0.0:
            ranges[percentile] = (-level, level)
        elif not signed and level > full[0]:
            ranges[percentile] = (full[0], level)
    return ranges


def ordinal(number: float) -> str:
    """``99.5`` -> ``"99.5th"``, ``99`` -> ``"99th"``, ``91`` -> ``"91st"``."""
    text = f"{number:g}"
    if not float(number).is_integer():
        return text + "th"
    whole = int(number)
    suffix = "th" if 10 <= whole % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(whole % 10, "th")
    return text + suffix


def scale_description(kind: str, signed: bool, clip_percentile: float | None,
                      value_range: tuple[float, float]) -> str:
    """The legend's sentence for a panel's own scale (the page says the same for the others)."""
    if kind == "fixed":
        return f"fixed scale from {value_range[0]:g} to {value_range[1]:g}"
    if kind == "percentile" and clip_percentile is not None:
        where = ordinal(clip_percentile)
        if signed:
            return f"values beyond ± the {where} percentile of |map| saturate"
        return f"values above the {where} percentile saturate"
    return ("full range: ± the largest |value|" if signed
            else "full range: minimum to maximum")


@dataclass(frozen=True)
class DisplayDefaults:
    """How a method's maps are shown unless the reader picks otherwise (declared on the
    Visualization class as ``display_clip_percentile`` and ``display_smoothed_view``)."""

    clip_percentile: float | None = None      # None: the full range
    smoothed_view: bool = False               # offer a smoothed-magnitude view

    @classmethod
    def of(cls, visualization: Any) -> "DisplayDefaults":
        clip = getattr(visualization, "display_clip_percentile", None)
        return cls(float(clip) if clip is not None and float(clip) < 100.0 else None,
                   bool(getattr(visualization, "display_smoothed_view", False)))


def smoothing_sigma_px(shape: tuple[int, ...]) -> float:
    """The Gaussian's standard deviation for a map of ``shape`` (H, W) in the smoothed view."""
    return max(1.0, round(min(shape[:2]) / 112.0 * SMOOTHING_PX_PER_112, 1))


@dataclass(frozen=True)
class DisplayScale:
    """The colour range a heatmap's stored pictures use, and why."""

    kind: str                               # "percentile" | "full" | "fixed"
    clip_percentile: float | None
    value_range: tuple[float, float]
    choices: dict[float, tuple[float, float]]   # clip percentile -> range; empty when fixed

    def record(self, panel: "Panel", defaults: DisplayDefaults) -> dict[str, Any]:
        """The panel record's ``display`` object."""
        height, width = np.asarray(panel.values).shape[:2]
        return {"scale": self.kind, "clip_percentile": self.clip_percentile,
                "range": [float(self.value_range[0]), float(self.value_range[1])],
                "description": scale_description(self.kind, bool(panel.signed),
                                                 self.clip_percentile, self.value_range),
                "ranges": {f"{percentile:g}": [float(low), float(high)]
                           for percentile, (low, high) in self.choices.items()},
                "smoothing_sigma_px": (smoothing_sigma_px((height, width))
                                       if defaults.smoothed_view else None),
                "size": [int(width), int(height)]}


def display_scale(panel: "Panel", defaults: DisplayDefaults) -> DisplayScale:
    """The default colour range of a heatmap panel: its fixed scale (e.g. probabilities 0..1),
    else the method's clip percentile of |map|, else the full range."""
    if panel.scale is not None:
        return DisplayScale("fixed", None, panel.value_range, {})
    choices = clipped_ranges(panel.values, bool(panel.signed))
    clip = defaults.clip_percentile
    if clip is None:
        return DisplayScale("full", None, choices[100.0], choices)
    if clip not in choices:
        choices = {**choices, **clipped_ranges(panel.values, bool(panel.signed), (clip,))}
        choices = dict(sorted(choices.items(), reverse=True))
    return DisplayScale("percentile", clip, choices[clip], choices)


def _finite(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.size and not np.isfinite(array).all():
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    return array


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


def colormap_hex(signed: bool) -> str:
    """The whole 256-entry lookup table as one hex string (``rrggbb`` x 256): what a page needs
    to colour a map exactly as ``colorize`` does."""
    return colormap_table(_colormap_name(signed)).tobytes().hex()


def render_panel(panel: "Panel", model_view: Image.Image, opacity: float = 0.5,
                 value_range: tuple[float, float] | None = None) -> RenderedPanel:
    """Both pictures of a panel. Heatmaps are coloured with ``value_range`` (default: the
    panel's own, ``Panel.value_range``); image panels (e.g. the occlusion grid) are shown as
    they are, in both slots."""
    if panel.kind != "heatmap":
        png = encode_png(np.asarray(panel.values, dtype=np.uint8))
        return RenderedPanel(png, png, panel.value_range)
    value_range = panel.value_range if value_range is None else value_range
    heat = colorize(panel.values, panel.signed, value_range)
    return RenderedPanel(encode_png(heat), encode_png(overlay(model_view, heat, opacity)),
                         value_range)
