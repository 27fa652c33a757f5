"""Rendering: colormaps (perceptual for unsigned, diverging around 0 for signed), overlays,
PNG encoding without pyplot, legends, and whole panels."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app.rendering import (RenderedPanel, colorize, colormap_table, encode_png, legend_stops,
                           normalize, overlay, render_panel)
from visualizations.base import Panel, TargetInfo


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def test_unsigned_colormap_brightness_rises_with_the_value() -> None:
    ramp = np.linspace(0.0, 5.0, 64, dtype=np.float32)[None, :]
    colours = colorize(ramp, signed=False)
    assert colours.dtype == np.uint8 and colours.shape == (1, 64, 3)
    brightness = luminance(colours[0])
    assert np.all(np.diff(brightness) > -1.0), "a perceptual map gets brighter monotonically"
    assert brightness[-1] - brightness[0] > 150


def test_signed_colormap_is_centred_at_zero() -> None:
    values = np.array([[-2.0, 0.0, 2.0, 1.0]], dtype=np.float32)
    colours = colorize(values, signed=True).astype(int)
    negative, zero, positive, _ = colours[0]
    assert negative[2] > negative[0], "negative values are blue"
    assert positive[0] > positive[2], "positive values are red"
    assert zero.min() > 230, "zero is (near) white"
    # Scaled by the largest magnitude: only positive values -> 0 stays white, not blue.
    only_positive = colorize(np.array([[0.0, 1.0]], dtype=np.float32), signed=True)
    assert only_positive[0, 0].min() > 230


def test_constant_and_given_ranges() -> None:
    flat = np.full((4, 4), 3.0, dtype=np.float32)
    assert np.all(normalize(flat, signed=False) == 0.0)
    assert np.all(normalize(np.zeros((2, 2)), signed=True) == 0.5)
    fixed = normalize(np.array([0.25, 0.5]), signed=False, value_range=(0.0, 1.0))
    np.testing.assert_allclose(fixed, [0.25, 0.5])


def test_colormap_tables_come_from_matplotlib_without_pyplot() -> None:
    table = colormap_table("inferno")
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert not table.flags.writeable
    # In a fresh interpreter, rendering a panel must not import pyplot (global state).
    code = ("import sys, numpy as np; from PIL import Image; from app.rendering import "
            "render_panel; from visualizations.base import Panel; "
            "render_panel(Panel('p', np.ones((4, 4), 'float32')), Image.new('RGB', (4, 4))); "
            "sys.exit(1 if 'matplotlib.pyplot' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_overlay_blends_at_the_given_opacity() -> None:
    view = Image.new("RGB", (8, 8), (0, 0, 0))
    heat = np.full((8, 8, 3), 200, dtype=np.uint8)
    assert np.asarray(overlay(view, heat, 0.0)).max() == 0
    assert np.asarray(overlay(view, heat, 1.0)).min() == 200
    assert np.asarray(overlay(view, heat, 0.5))[0, 0, 0] == 100
    grayscale = Image.new("L", (4, 4), 100)  # resized to the map and converted to RGB
    blended = overlay(grayscale, heat, 0.5)
    assert blended.size == (8, 8) and blended.mode == "RGB"


def test_png_round_trip() -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    data = encode_png(array)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), array)
    assert encode_png(Image.fromarray(array)) == data


def test_legends() -> None:
    unsigned = legend_stops(False)
    signed = legend_stops(True, n=5)
    assert len(unsigned) == 11 and len(signed) == 5
    assert all(len(stop) == 7 and stop.startswith("#") for stop in unsigned + signed)
    middle = signed[2]
    assert all(int(middle[i:i + 2], 16) > 230 for i in (1, 3, 5)), "signed legend: white at 0"
    # The stops are the colormap's own colours, low to high.
    assert unsigned[0] == "#%02x%02x%02x" % tuple(colormap_table("inferno")[0])
    assert unsigned[-1] == "#%02x%02x%02x" % tuple(colormap_table("inferno")[255])
    assert int(signed[0][5:7], 16) > int(signed[0][1:3], 16), "signed legend starts blue"


def test_render_panel_heatmap_and_image_panels() -> None:
    view = Image.new("RGB", (16, 16), (50, 60, 70))
    values = np.zeros((16, 16), dtype=np.float32)
    values[4:8, 4:8] = 1.0
    target = TargetInfo(1, "cat", 0.9)
    rendered = render_panel(Panel("p", values, signed=False, target=target), view, opacity=0.6)
    assert isinstance(rendered, RenderedPanel)
    assert rendered.value_range == (0.0, 1.0)
    heat = np.asarray(Image.open(io.BytesIO(rendered.heatmap_png)))
    assert heat.shape == (16, 16, 3)
    assert luminance(heat[5, 5]) > luminance(heat[0, 0]) + 100
    over = np.asarray(Image.open(io.BytesIO(rendered.overlay_png)))
    assert over.shape == (16, 16, 3) and not np.array_equal(over, heat)

    signed = render_panel(Panel("s", values - 0.25, signed=True), view)
    assert signed.value_range == (-0.75, 0.75)
    fixed = render_panel(Panel("f", values * 0.5, scale=(0.0, 1.0)), view)
    assert fixed.value_range == (0.0, 1.0)

    picture = np.full((16, 16, 3), 99, dtype=np.uint8)
    image_panel = render_panel(Panel("grid", picture, kind="image"), view)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image_panel.heatmap_png))),
                                  picture)


@pytest.mark.parametrize("signed", [False, True])
def test_non_finite_values_do_not_crash_rendering(signed: bool) -> None:
    values = np.array([[np.nan, 1.0], [np.inf, -np.inf]], dtype=np.float32)
    assert colorize(values, signed).shape == (2, 2, 3)
