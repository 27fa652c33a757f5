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


# --- display scaling -----------------------------------------------------------------------------

def linear_percentile(values: np.ndarray, percent: float) -> float:
    """A reference percentile written out by hand (sort, then interpolate between neighbours:
    numpy's default "linear" method), independent of np.percentile."""
    ordered = sorted(float(v) for v in np.ravel(values))
    position = (len(ordered) - 1) * percent / 100.0
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def test_clipped_ranges_match_a_hand_written_percentile() -> None:
    from app.rendering import CLIP_CHOICES, clipped_ranges

    rng = np.random.default_rng(3)
    unsigned = rng.gamma(1.0, 1.0, size=(40, 30)).astype(np.float32)
    ranges = clipped_ranges(unsigned, signed=False)
    assert set(ranges) == set(CLIP_CHOICES)
    assert ranges[100.0] == pytest.approx((unsigned.min(), unsigned.max()))
    for percent in (99.5, 99.0, 97.0):
        low, high = ranges[percent]
        assert low == pytest.approx(float(unsigned.min()))
        assert high == pytest.approx(linear_percentile(unsigned, percent), rel=1e-5)
    signed = rng.standard_t(2, size=(40, 30)).astype(np.float32)
    ranges = clipped_ranges(signed, signed=True)
    bound = linear_percentile(np.abs(signed), 99.0)
    assert ranges[99.0] == pytest.approx((-bound, bound), rel=1e-5)
    assert ranges[100.0] == pytest.approx((-np.abs(signed).max(), np.abs(signed).max()))


def test_a_clip_never_paints_a_large_area_in_the_top_colour() -> None:
    from app.rendering import clipped_ranges

    def saturated(values: np.ndarray, signed: bool, value_range: tuple[float, float]) -> float:
        top = value_range[1]
        return float(((np.abs(values) if signed else values) >= top).mean())

    sparse = np.zeros((20, 20), dtype=np.float32)
    sparse[3, 4], sparse[5, 6] = 2.0, -1.0              # 99.5 % of the map is 0
    plateau = np.full((20, 20), 3.0, dtype=np.float32)
    plateau[:2, :2] = 0.0                               # 99 % of the map at its top value
    for values in (sparse, plateau, outlier_map()):
        for signed in (False, True):
            for percent, value_range in clipped_ranges(values, signed).items():
                if value_range != clipped_ranges(values, signed)[100.0]:
                    assert saturated(values, signed, value_range) <= (100 - percent) / 100 + 0.01
    # Unsigned, the sparse map's 99th percentile is 0 -- all zeros would take the top colour.
    assert clipped_ranges(sparse, False)[99.0] == (-1.0, 2.0)
    assert clipped_ranges(plateau, False)[97.0] == (0.0, 3.0)
    assert clipped_ranges(np.zeros((3, 3), np.float32), True)[99.0] == (0.0, 0.0)


def test_methods_declare_their_display_defaults() -> None:
    from app.rendering import DisplayDefaults
    from visualizations import visualization_registry

    declared = {name: DisplayDefaults.of(visualization_registry.get(name))
                for name in visualization_registry.names()}
    gradient_maps = {"saliency", "integrated_gradients", "guided_grad_cam"}
    for name, defaults in declared.items():
        if name in gradient_maps:
            assert defaults.clip_percentile is not None and 98.0 <= defaults.clip_percentile < 100
            assert defaults.smoothed_view, name
        else:      # CAM-type and occlusion maps are shown as they were: the full range
            assert defaults == DisplayDefaults(), name


def test_scale_descriptions_say_which_scale() -> None:
    from app.rendering import ordinal, scale_description

    assert [ordinal(p) for p in (99.5, 99, 97, 91, 92, 93, 11, 100)] == [
        "99.5th", "99th", "97th", "91st", "92nd", "93rd", "11th", "100th"]
    assert scale_description("percentile", False, 99.5, (0, 1)) == \
        "values above the 99.5th percentile saturate"
    assert scale_description("percentile", True, 99.0, (-1, 1)) == \
        "values beyond ± the 99th percentile of |map| saturate"
    assert scale_description("full", False, None, (0, 1)) == "full range: minimum to maximum"
    assert scale_description("full", True, None, (-1, 1)) == "full range: ± the largest |value|"
    assert scale_description("fixed", False, None, (0.0, 1.0)) == "fixed scale from 0 to 1"


def outlier_map() -> np.ndarray:
    """A gradient-like map: structure everywhere, and a few outlier pixels 40x brighter."""
    rng = np.random.default_rng(7)
    values = rng.uniform(0.0, 1.0, size=(64, 64)).astype(np.float32)
    values[rng.integers(0, 64, 8), rng.integers(0, 64, 8)] = 40.0
    return values


def test_the_panel_record_carries_its_display_and_keeps_the_array() -> None:
    from app.pipeline import npy_bytes, panel_record
    from app.rendering import DisplayDefaults

    values = outlier_map()
    before = values.copy()
    panel = Panel("Saliency for cat", values, signed=False, target=TargetInfo(1, "cat", 0.9))
    view = Image.new("RGB", (64, 64), (90, 90, 90))

    def bright_share(files: dict[str, bytes], record: dict) -> float:
        heat = np.asarray(Image.open(io.BytesIO(files[record["heatmap"]])))
        return float((luminance(heat) / 255.0 > 0.25).mean())

    clipped_files: dict[str, bytes] = {}
    clipped = panel_record(0, panel, view, clipped_files, DisplayDefaults(99.5, True))
    full_files: dict[str, bytes] = {}
    full = panel_record(0, panel, view, full_files)

    # The array is stored as computed, whatever the display; the input is not modified.
    np.testing.assert_array_equal(values, before)
    assert clipped_files[clipped["array"]] == full_files[full["array"]] == npy_bytes(before)
    assert clipped["value_range"] == full["value_range"] == [float(before.min()), 40.0]

    display = clipped["display"]
    assert display["scale"] == "percentile" and display["clip_percentile"] == 99.5
    assert display["range"] == pytest.approx([before.min(), linear_percentile(before, 99.5)],
                                             rel=1e-5)
    assert display["description"] == "values above the 99.5th percentile saturate"
    assert set(display["ranges"]) == {"100", "99.5", "99", "97"}
    assert display["ranges"]["100"] == full["value_range"]
    assert display["smoothing_sigma_px"] == 1.0 and display["size"] == [64, 64]
    assert full["display"]["scale"] == "full" and full["display"]["smoothing_sigma_px"] is None
    # The outliers set the full range, so almost everything is dark; clipped, the structure shows.
    assert bright_share(full_files, full) < 0.01
    assert bright_share(clipped_files, clipped) > 0.5

    fixed = panel_record(0, Panel("P(cat)", values / 40.0, scale=(0.0, 1.0)), view, {})
    assert fixed["display"]["scale"] == "fixed" and fixed["display"]["ranges"] == {}
    assert fixed["display"]["range"] == [0.0, 1.0]
    picture = panel_record(1, Panel("grid", np.zeros((8, 8, 3), np.uint8), kind="image"), view, {})
    assert picture["display"] is None


def test_render_panel_uses_the_given_range_and_the_colormap_travels_as_hex() -> None:
    from app.rendering import colormap_hex

    view = Image.new("RGB", (4, 1))
    values = np.array([[0.0, 0.5, 1.0, 4.0]], dtype=np.float32)
    rendered = render_panel(Panel("p", values), view, value_range=(0.0, 1.0))
    heat = np.asarray(Image.open(io.BytesIO(rendered.heatmap_png)))
    table = colormap_table("inferno")
    np.testing.assert_array_equal(heat[0], table[[0, 128, 255, 255]])
    assert rendered.value_range == (0.0, 1.0)
    for signed, name in ((False, "inferno"), (True, "RdBu_r")):
        text = colormap_hex(signed)
        assert len(text) == 256 * 6
        assert bytes.fromhex(text) == colormap_table(name).tobytes()
