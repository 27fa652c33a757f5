"""The real thing: `convscope serve` with the demo model, driven by Chromium through Playwright.

Uploads the cat photo through the file input (and a PNG whose file name is an XSS payload),
runs grad_cam and occlusion, and checks the results page: the grid's overlays are loaded images,
the cat's cell opens its panel in place, the top-1 class is a cat, nothing was logged to the
console, and the hostile name is shown as text.
Skips when Chromium or Playwright is missing, unless ``CONVSCOPE_REQUIRE_BROWSER=1`` (CI).
(The README's screenshots come from test_browser_screenshots.py.)
"""
from __future__ import annotations


import pytest

from tests.browser import (ARTIFACTS, CAT_CLASSES, CAT_PHOTO, HOSTILE_NAME, page_problems,
                           png_payload, running_server)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def demo_server(tmp_path):
    """`convscope serve` (the demo) on a free loopback port; stopped with SIGTERM afterwards."""
    with running_server(tmp_path) as base:
        yield base


def test_upload_run_and_read_results_in_chromium(chromium, demo_server):
    dialogs: list[str] = []
    with chromium.new_page(viewport={"width": 1400, "height": 1000}) as page:
        problems = page_problems(page)
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

        page.goto(demo_server + "/")
        page.set_input_files("#image-input", str(CAT_PHOTO))
        page.set_input_files("#image-input", files=[{
            "name": HOSTILE_NAME, "mimeType": "image/png", "buffer": png_payload()}])
        page.wait_for_selector(".thumb[data-image-id] >> nth=1", timeout=30_000)
        names = page.locator(".thumb .filename").all_text_contents()
        assert names == ["chelsea.jpg", HOSTILE_NAME]

        page.check("input[name=method][value=grad_cam]")
        page.check("input[name=method][value=occlusion]")
        page.click("fieldset.method:has(input[value=occlusion]) summary")
        # A 4 x 4 grid keeps the test quick.
        page.fill("#p-occlusion-window", "56")
        page.fill("#p-occlusion-stride", "56")
        page.click("#run-button")
        page.wait_for_url("**/jobs/*", timeout=30_000)
        page.wait_for_selector("#job[data-finished=true]", timeout=180_000)
        # Function-form predicates: the page's CSP forbids the eval a plain expression needs.
        grid_loaded = ("() => Array.from(document.querySelectorAll('#results-grid img'))"
                       ".every(i => i.complete && i.naturalWidth > 0)")
        page.wait_for_function(grid_loaded, timeout=30_000)

        assert page.text_content("#job-status") == "done"
        overlays = page.evaluate("Array.from(document.querySelectorAll('img.grid-overlay'))"
                                 ".map(i => i.naturalWidth)")
        assert len(overlays) == 4 and all(width > 0 for width in overlays), overlays

        # The cat's row: its Grad-CAM cell opens the full panel in place, under the row.
        cat_row = page.locator("tr.grid-row", has=page.locator(".filename",
                                                              has_text="chelsea.jpg"))
        cat_row.locator("a.cell").first.click()
        detail = page.locator(".view.detail.open")
        detail.wait_for(state="visible")
        page.wait_for_function("() => Array.from(document.querySelectorAll('.view.open img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        assert detail.locator(".legend-scale").first.text_content().startswith("Own scale")

        # The hostile name is text on the page, and nothing it carries ever ran.
        shown = page.locator(".row-head .filename").all_text_contents()
        assert HOSTILE_NAME in shown
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0

        slider = detail.locator(".opacity-slider").first
        slider.fill("0.9")
        opacity = page.evaluate("getComputedStyle(document.querySelector("
                                "'.view.open .panel .layer')).opacity")
        assert float(opacity) == pytest.approx(0.9)
        slider.fill("0.5")
        page.evaluate("document.activeElement.blur()")

        # The row's heading opens the image's view: every prediction, and every method.
        cat_row.locator("a.row-link").click()
        compare = page.locator(".view.compare.open")
        compare.wait_for(state="visible")
        top1 = compare.locator(".topk tr.top1 .class-index").text_content()
        assert int(top1.strip("() ")) in CAT_CLASSES, top1

        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "browser-job-results.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert dialogs == [], f"a dialog opened: {dialogs}"
    assert problems == [], problems
