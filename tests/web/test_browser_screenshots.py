"""The README's screenshots, taken from the real page: `convscope serve` with the demo model in
Chromium. Runs only with ``CONVSCOPE_UPDATE_SCREENSHOT=1`` (it writes into docs/ and computes
the default maps of every demo photo, a few minutes on a laptop CPU).

* ``docs/screenshot-results.png``: the results grid of the five demo photos (the cat given the
  true label "tabby", so its row is a failure case) with the cat's Grad-CAM detail open;
* ``docs/maps-before.png`` / ``docs/maps-after.png``: the gradient maps of the cat compared
  side by side, coloured by their full range (what every version before display scaling
  showed) and at their default display.
"""
from __future__ import annotations

import json
import os
import urllib.request

import pytest

from tests.browser import ROOT, page_problems, running_server
from tests.web.results_job import _run, _upload

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("CONVSCOPE_UPDATE_SCREENSHOT") != "1",
    reason="writes the README's screenshots; set CONVSCOPE_UPDATE_SCREENSHOT=1")]

PHOTOS = sorted((ROOT / "demo" / "images").glob("*.jpg"))
TABBY = 281
GRADIENT_MAPS = [{"name": "saliency"}, {"name": "saliency", "params": {"smoothgrad_samples": 16}},
                 {"name": "integrated_gradients"}, {"name": "guided_grad_cam"}]


def upload_photos(base: str) -> dict[str, str]:
    ids = _upload(base, [(path.read_bytes(), path.name) for path in PHOTOS])
    return dict(zip((path.name for path in PHOTOS), ids))


def test_readme_screenshots(tmp_path, chromium):
    with running_server(tmp_path) as base:
        ids = upload_photos(base)
        cat = ids["chelsea.jpg"]
        maps = _run(base, {"images": [cat], "visualizations": GRADIENT_MAPS}, timeout_s=900)
        grid = _run(base, {"images": list(ids.values()), "true_labels": {cat: TABBY},
                           "visualizations": [{"name": "grad_cam"}, {"name": "occlusion"},
                                              *GRADIENT_MAPS]}, timeout_s=1800)
        page = chromium.new_page(viewport={"width": 1440, "height": 1000},
                                 device_scale_factor=1)
        problems = page_problems(page)

        # Before and after: the cat's gradient maps compared large, on the comparison's own
        # page, with the maps at 85 % opacity over the photo.
        page.goto(base + maps["url"] + "/views/compare-image-0")
        view = page.locator(".view.compare")
        page.wait_for_function("() => Array.from(document.querySelectorAll('.view img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.locator("#opacity-all").fill("0.85")
        page.evaluate("document.activeElement.blur()")
        view.screenshot(path=str(ROOT / "docs" / "maps-after.png"))
        page.select_option("#clip-all", "100")
        page.wait_for_function("() => Array.from(document.querySelectorAll('.view img.layer'))"
                               ".every(i => i.src.startsWith('blob:') && i.complete)")
        page.evaluate("document.activeElement.blur()")
        view.screenshot(path=str(ROOT / "docs" / "maps-before.png"))

        # The results grid with the cat's Grad-CAM detail open.
        page.goto(base + grid["url"])
        page.click("tr.grid-row.failure a.cell")
        page.locator(".view.detail.open").wait_for()
        page.wait_for_function("() => Array.from(document.querySelectorAll('#results img'))"
                               ".filter(i => i.getClientRects().length)"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.evaluate("document.activeElement.blur(); scrollTo(0, 0)")
        page.locator("#results").screenshot(path=str(ROOT / "docs" / "screenshot-results.png"))
        page.close()
        with urllib.request.urlopen(base + maps["api_url"]) as response:
            record = json.loads(response.read())
        assert all(item["status"] == "done" for item in record["results"][0]["visualizations"])
    assert problems == [], problems
