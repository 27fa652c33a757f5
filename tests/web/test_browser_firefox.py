"""The same walk through the product as test_browser.py, in Firefox (Debian's ESR).

`convscope serve` with the demo model: upload the cat photo and a PNG whose file name is an XSS
payload through the file input, run grad_cam and a coarse occlusion, and read the results page:
the grid's overlays are loaded images, the cat's cell opens its panel in place, the top-1 class
is a cat, the hostile name is text, the opacity slider works from the keyboard, and Firefox's console holds no error from the page (CSP
violations included). Skips when Firefox or marionette-driver is missing, unless
``CONVSCOPE_REQUIRE_BROWSER=1`` (CI).
"""
from __future__ import annotations

import pytest

from tests.browser import (ARTIFACTS, CAT_CLASSES, CAT_PHOTO, HOSTILE_NAME, ROOT, firefox,
                           firefox_console_errors, firefox_or_skip, png_payload, running_server,
                           wait_until)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_upload_run_and_read_results_in_firefox(tmp_path):
    firefox_or_skip()
    from marionette_driver.by import By
    from marionette_driver.errors import NoAlertPresentException
    from marionette_driver.keys import Keys

    hostile = tmp_path / "uploads" / HOSTILE_NAME
    hostile.parent.mkdir()
    hostile.write_bytes(png_payload())

    with running_server(tmp_path) as base, firefox() as client:
        def script(source: str, *args):
            return client.execute_script(source, script_args=list(args))

        def css(selector: str):
            return client.find_element(By.CSS_SELECTOR, selector)

        client.navigate(base + "/")
        file_input = css("#image-input")
        file_input.send_keys(str(CAT_PHOTO))
        file_input.send_keys(str(hostile))
        wait_until(lambda: script(
            "return document.querySelectorAll('.thumb[data-image-id]').length") == 2,
            30, "both uploads to be stored")
        names = script("return Array.from(document.querySelectorAll('.thumb .filename'))"
                       ".map(e => e.textContent)")
        assert names == ["chelsea.jpg", HOSTILE_NAME]

        css("input[name=method][value=grad_cam]").click()
        css("input[name=method][value=occlusion]").click()
        css("fieldset.method:has(input[value=occlusion]) summary").click()
        for field in ("#p-occlusion-window", "#p-occlusion-stride"):   # a quick 4 x 4 grid
            css(field).clear()
            css(field).send_keys("56")
        css("#run-button").click()
        wait_until(lambda: "/jobs/" in client.get_url(), 30, "the job page")
        wait_until(lambda: script(
            "const job = document.getElementById('job');"
            "return job !== null && job.dataset.finished === 'true'"), 180, "the job to finish")
        grid_loaded = ("return Array.from(document.querySelectorAll('#results-grid img'))"
                       ".every(i => i.complete && i.naturalWidth > 0)")
        wait_until(lambda: script(grid_loaded), 30, "the grid's images to load")

        assert css("#job-status").text == "done"
        overlays = script("return Array.from(document.querySelectorAll('img.grid-overlay'))"
                          ".map(i => i.naturalWidth)")
        assert len(overlays) == 4 and all(width > 0 for width in overlays), overlays

        # The cat's Grad-CAM cell opens its panel in place.
        script("""Array.from(document.querySelectorAll('tr.grid-row'))
            .find(r => r.querySelector('.filename').textContent.includes('chelsea.jpg'))
            .querySelector('a.cell').click();""")
        wait_until(lambda: script(
            "const open = document.querySelector('.view.detail.open');"
            "return open !== null && Array.from(open.querySelectorAll('img'))"
            ".every(i => i.complete && i.naturalWidth > 0)"), 30, "the detail's images")

        shown = script("return Array.from(document.querySelectorAll('.row-head .filename'))"
                       ".map(e => e.textContent)")
        assert HOSTILE_NAME in shown
        assert script("return document.querySelectorAll('img[src=\"x\"]').length") == 0

        # Keyboard: the slider takes focus and arrow keys move it (step 0.05 from 0.5).
        slider = css(".view.open .opacity-slider")
        slider.send_keys(Keys.ARROW_RIGHT + Keys.ARROW_RIGHT)
        opacity = script("return getComputedStyle(document.querySelector("
                         "'.view.open .panel .layer')).opacity")
        assert float(opacity) == pytest.approx(0.6)

        # The row's heading opens the image's view: every prediction, and every method.
        script("""Array.from(document.querySelectorAll('tr.grid-row'))
            .find(r => r.querySelector('.filename').textContent.includes('chelsea.jpg'))
            .querySelector('a.row-link').click();""")
        wait_until(lambda: script("return document.querySelector('.view.compare.open .topk') "
                                  "!== null"), 30, "the image's view")
        top1 = script("return document.querySelector('.view.compare.open .topk tr.top1 "
                      ".class-index').textContent")
        assert int(top1.strip("() ")) in CAT_CLASSES, top1

        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "firefox-job-results.png").write_bytes(
            client.screenshot(format="binary", full=True))

        with pytest.raises(NoAlertPresentException):   # the payload never opened a dialog
            client.switch_to_alert().text
        assert firefox_console_errors(client, base) == []
    assert ROOT.joinpath("test-artifacts", "firefox-job-results.png").stat().st_size > 0
