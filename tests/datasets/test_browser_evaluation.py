"""Dataset mode in real browsers: `convscope serve` with the demo model and its bundled labelled
sample set. Open the Datasets page, run an evaluation, click a confusion cell, select a failure,
Explain, and read the job page: panels for the true and the predicted class. Chromium through
Playwright, Firefox ESR through Marionette; skipped when a browser is missing, unless
``CONVSCOPE_REQUIRE_BROWSER=1`` (CI). ``CONVSCOPE_UPDATE_SCREENSHOT=1`` refreshes
``docs/screenshot-evaluation.png``."""
from __future__ import annotations

import json
import os
import urllib.request

import pytest

from tests.browser import (ARTIFACTS, ROOT, firefox, firefox_console_errors, firefox_or_skip,
                           page_problems, running_server, wait_until)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TABBY, EGYPTIAN_CAT = 281, 285         # the sample set's tabby folder; the demo model's answer
CELL = f'a.cell-link[data-row="{TABBY}"][data-column="other"]'


def job_targets(base: str, job_url: str) -> tuple[dict, set[int]]:
    """The explained image's record and the classes its panels are for (from the job's JSON)."""
    job_id = job_url.rstrip("/").rsplit("/", 1)[-1]
    with urllib.request.urlopen(f"{base}/api/v1/jobs/{job_id}", timeout=10) as response:
        job = json.loads(response.read())
    result = job["results"][0]
    targets = {panel["target"]["index"] for visualization in result["visualizations"]
               for panel in visualization["panels"] if panel["target"]}
    return result, targets


def test_from_the_confusion_matrix_to_the_maps_in_chromium(chromium, tmp_path) -> None:
    with running_server(tmp_path) as base, \
            chromium.new_page(viewport={"width": 1400, "height": 1000}) as page:
        problems = page_problems(page)
        page.goto(base + "/datasets")
        dataset = page.locator("li.dataset", has_text="sample-photos")
        dataset.locator(".evaluate-button").click()
        page.wait_for_url("**/evaluations/*", timeout=30_000)
        page.wait_for_selector("#evaluation[data-finished=true]", timeout=180_000)
        assert page.text_content("#evaluation-status") == "done"
        assert page.text_content("#accuracy").strip().endswith("%")
        assert page.locator("table.confusion tbody tr").count() == 7
        assert page.locator("svg.diagram rect").count() > 2

        if os.environ.get("CONVSCOPE_UPDATE_SCREENSHOT") == "1":
            page.locator(CELL).hover()
            page.screenshot(path=str(ROOT / "docs" / "screenshot-evaluation.png"),
                            clip={"x": 0, "y": 0, "width": 1400, "height": 1000})
        page.click(CELL)
        page.wait_for_selector("#cell-images")
        cell = page.locator("#cell-images")
        assert "tabby" in cell.locator("h2").text_content()
        assert cell.locator(".eval-image").count() == 4
        cell.locator(".eval-image img").last.scroll_into_view_if_needed()
        # Polled from here: Playwright's own polling evaluates strings, which the page's
        # Content-Security-Policy (no 'unsafe-eval') forbids.
        wait_until(lambda: page.evaluate("Array.from(document.querySelectorAll("
                                         "'#cell-images img')).every(i => i.complete && "
                                         "i.naturalWidth > 0)"), 30, "the thumbnails")

        first = cell.locator(".eval-image").first
        assert "Egyptian cat" in first.text_content()
        first.locator("input.image-choice").check()
        assert page.locator("input[name=method][value=grad_cam]").is_checked()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-evaluation.png"), full_page=True)
        page.click("#explain-button")
        page.wait_for_url("**/jobs/*", timeout=30_000)
        page.wait_for_selector("#job[data-finished=true]", timeout=180_000)
        assert page.text_content("#job-status") == "done"

        result, targets = job_targets(base, page.url)
        assert result["failure"] is True
        assert result["true_label"]["index"] == TABBY
        assert targets == {TABBY, EGYPTIAN_CAT}
        # The failure's grid row: its true label, and a cell with the maps of both classes.
        row = page.locator("tr.grid-row.failure").first
        text = row.text_content()
        assert "tabby" in text and "Egyptian cat" in text
        roles = row.locator(".cell-role").all_text_contents()
        assert roles == ["pred: Egyptian cat", "true: tabby"], roles
        wait_until(lambda: page.evaluate("Array.from(document.querySelectorAll("
                                         "'tr.grid-row.failure img')).every(i => i.complete "
                                         "&& i.naturalWidth > 0)"), 30, "the maps")
        page.screenshot(path=str(ARTIFACTS / "browser-evaluation-explained.png"), full_page=True)
        assert problems == [], problems


def test_from_the_confusion_matrix_to_the_maps_in_firefox(tmp_path) -> None:
    firefox_or_skip()
    from marionette_driver.by import By

    with running_server(tmp_path) as base, firefox() as client:
        def script(source: str, *args):
            return client.execute_script(source, script_args=list(args))

        def css(selector: str):
            return client.find_element(By.CSS_SELECTOR, selector)

        client.navigate(base + "/datasets")
        script("""Array.from(document.querySelectorAll('li.dataset'))
                  .find(li => li.textContent.includes('sample-photos'))
                  .querySelector('.evaluate-button').click();""")
        wait_until(lambda: "/evaluations/" in client.get_url(), 30, "the evaluation page")
        wait_until(lambda: script("const e = document.getElementById('evaluation');"
                                  "return e !== null && e.dataset.finished === 'true'"),
                   180, "the evaluation to finish")
        assert css("#evaluation-status").text == "done"
        css(CELL).click()
        wait_until(lambda: script("return document.getElementById('cell-images') !== null"),
                   30, "the cell's images")
        assert script("return document.querySelectorAll('#cell-images .eval-image').length") == 4
        script("document.querySelector('#cell-images .eval-image:last-child')"
               ".scrollIntoView()")
        wait_until(lambda: script("return Array.from(document.querySelectorAll("
                                  "'#cell-images img')).every(i => i.complete && "
                                  "i.naturalWidth > 0)"), 30, "the thumbnails")
        css("#cell-images input.image-choice").click()
        css("#explain-button").click()
        wait_until(lambda: "/jobs/" in client.get_url(), 30, "the job page")
        wait_until(lambda: script("const job = document.getElementById('job');"
                                  "return job !== null && job.dataset.finished === 'true'"),
                   180, "the Explain job to finish")
        assert css("#job-status").text == "done"
        result, targets = job_targets(base, client.get_url())
        assert result["failure"] is True and targets == {TABBY, EGYPTIAN_CAT}
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "firefox-evaluation-explained.png").write_bytes(
            client.screenshot(format="binary", full=True))
        assert firefox_console_errors(client, base) == []
