"""``report.html`` has the job page's grid, detail and compare views, self-contained, and every
map at its method's default colour scale -- the one its legend states."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.rendering import colorize
from tests.visualizations.test_report import write_checkpoint_dir, write_image


def between(html: str, start: str, end: str) -> str:
    begin = html.index(start)
    return html[begin:html.index(end, begin)]


@pytest.fixture
def report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str, dict]:
    directory = write_checkpoint_dir(tmp_path / "runs", {"tiny.pt": 0})
    images = [write_image(tmp_path / f"photo{n}.png", n) for n in range(3)]
    out_dir = tmp_path / "report"
    status = main(["visualize", str(directory), *map(str, images), "--method", "saliency",
                   "--method", "integrated_gradients", "--param", "integrated_gradients.steps=4",
                   "--method", "grad_cam", "--out", str(out_dir)])
    assert status == 0, capsys.readouterr().err
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    return out_dir, html, results


def test_the_report_has_the_grid_and_its_views(report) -> None:
    _, html, _ = report
    grid = between(html, '<table class="results-grid', "</table>")
    assert html.index("results-grid") < html.index('class="view detail"')
    assert len(re.findall(r'<tr class="grid-row"', grid)) == 3
    for row in range(3):
        assert f'href="#compare-image-{row}"' in grid and f'id="compare-image-{row}"' in html
        for method in range(3):
            assert f'href="#detail-{row}-{method}"' in grid
            assert f'id="detail-{row}-{method}"' in html
    assert 'href="#compare-method-2"' in grid and 'id="compare-method-2"' in html
    # Static: no script, no slider, no scale choices; the views open by fragment (:target).
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert "opacity-slider" not in html and "data-display" not in html
    assert "html:not(.js) .view:target" in html
    # Each picture is in the file once, however many views show it.
    uris = re.findall(r'<image id="pic-\d+" href="(data:image/png;base64,[^"]+)"', html)
    assert len(uris) == len(set(uris)) == 3 + 3 * 3            # views + one map per cell
    assert html.count("data:image/png") == len(uris)
    assert len(re.findall(r'<use href="#pic-', html)) > 3 * len(uris)
    assert "steps=4" in between(html, 'id="detail-0-1"', "</section>")


def test_every_map_shows_its_default_scale_and_says_so(report) -> None:
    out_dir, html, results = report
    checked = 0
    for image in results["images"]:
        for visualization in image["visualizations"]:
            for panel in visualization["panels"]:
                values = np.load(out_dir / panel["array"], allow_pickle=False)
                display = panel["display"]
                if visualization["method"] == "grad_cam":
                    assert display["scale"] == "full" and display["range"] == panel["value_range"]
                    continue
                # Gradient maps: clipped at the 99.5th percentile of |map| (numpy's own).
                assert display["clip_percentile"] == 99.5
                if panel["signed"]:
                    bound = float(np.percentile(np.abs(values), 99.5))
                    assert display["range"] == pytest.approx([-bound, bound], rel=1e-5)
                else:
                    assert display["range"] == pytest.approx(
                        [values.min(), np.percentile(values, 99.5)], rel=1e-5)
                stored = np.asarray(Image.open(out_dir / panel["heatmap"]).convert("RGB"))
                expected = colorize(values, panel["signed"], tuple(display["range"]))
                assert (np.abs(stored.astype(int) - expected).max(axis=-1) <= 1).mean() > 0.99
                checked += 1
    assert checked == 6
    assert html.count("Own scale: values above the 99.5th percentile saturate.") >= 3
    assert html.count("Own scale: values beyond ± the 99.5th percentile of |map| saturate.") >= 3
    assert "Own scale: full range: minimum to maximum." in html


def test_the_grid_cells_show_the_stored_maps(report) -> None:
    out_dir, html, results = report
    grid = between(html, '<table class="results-grid', "</table>")
    layers = re.findall(r'<svg class="layer overlay map-image grid-overlay picture" '
                        r'viewBox="0 0 32 32" role="img" aria-label="[^"]+"><use href="#([^"]+)"',
                        grid)
    assert len(layers) == 9
    uris = dict(re.findall(r'<image id="(pic-\d+)" href="data:image/png;base64,([^"]+)"', html))
    first = results["images"][0]["visualizations"][0]["panels"][0]
    assert base64.b64decode(uris[layers[0]]) == (out_dir / first["heatmap"]).read_bytes()
    assert Image.open(io.BytesIO(base64.b64decode(uris[layers[0]]))).size == (32, 32)
