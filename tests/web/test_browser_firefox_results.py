"""Firefox (Debian's ESR, over Marionette): the results page of 16 images x 7 methods.

The grid, a detail and both compare views fit every width from 1280 to 2560 px; every picture
of the grid loads; the time to the first grid paint is printed; the keyboard moves between
cells and opens and closes the detail; a new clip re-colours a map as the renderer would; and
Firefox's console holds no error from the page (CSP violations included).
"""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.browser import (ARTIFACTS, firefox, firefox_console_errors, firefox_or_skip,
                           running_server, wait_until)
from tests.web.results_job import (FAILURES, IMAGES, METHODS, SERVER_ENVIRONMENT,
                                   checkpoint_dir, make_results_job)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WIDTHS = (1280, 1440, 1920, 2560)

OVERFLOW = """
    const root = document.documentElement;
    const wide = Array.from(document.querySelectorAll('main *'))
        .filter(e => e.getClientRects().length
                     && e.getBoundingClientRect().right > root.clientWidth + 1)
        .slice(0, 3).map(e => e.tagName + '.' + e.className);
    return {scroll: root.scrollWidth, client: root.clientWidth, wide, inner: innerWidth};"""
LOADED = """const images = Array.from(document.querySelectorAll(arguments[0]));
    return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);"""


def test_results_grid_and_views_in_firefox(tmp_path):
    firefox_or_skip()
    from marionette_driver.by import By
    from marionette_driver.keys import Keys

    with (running_server(tmp_path, [str(checkpoint_dir(tmp_path))],
                         environment=SERVER_ENVIRONMENT) as base,
          firefox(width=1280, height=900) as client):
        job = make_results_job(base)

        def script(source: str, *args):
            return client.execute_script(source, script_args=list(args))

        def css(selector: str):
            return client.find_element(By.CSS_SELECTOR, selector)

        def fits(what: str) -> None:
            found = script(OVERFLOW)
            assert found["scroll"] <= found["client"] and not found["wide"], f"{what}: {found}"

        def scroll_through() -> None:
            height = script("return document.body.scrollHeight")
            for y in range(0, height, 450):
                script("scrollTo(0, arguments[0])", y)
                time.sleep(0.05)
            script("scrollTo(0, 0)")

        failures = {job["results"][n]["filename"] for n in FAILURES}
        timings = []
        for width in WIDTHS:
            client.set_window_rect(width=width, height=900)
            client.navigate(base + job["url"])
            wait_until(lambda: script("return performance.getEntriesByName("
                                      "'convscope:grid-painted').length"), 30, "the grid paint")
            timings.append((width, script("""return {
                inner: innerWidth,
                grid: performance.getEntriesByName('convscope:grid-painted')[0].startTime,
                fcp: (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime,
                domContentLoaded: performance.getEntriesByType('navigation')[0]
                                  .domContentLoadedEventEnd};""")))
            names = script("return Array.from(document.querySelectorAll("
                           "'#results-grid tr.grid-row .row-head .filename'))"
                           ".map(e => e.textContent)")
            assert len(names) == IMAGES and set(names[:len(FAILURES)]) == failures
            assert script("return document.querySelectorAll('#results-grid a.cell').length") == \
                IMAGES * len(METHODS)
            fits(f"grid at {width}px")
            scroll_through()
            wait_until(lambda: script(LOADED, "#results-grid img"), 60, "every grid picture")
            for opener, view in (("#results-grid tr.grid-row a.cell", ".view.detail.open"),
                                 ("a.compare-link[data-view=compare-method-1]",
                                  ".view.compare.open"),
                                 ("#results-grid tr.grid-row:nth-child(3) a.row-link",
                                  ".view.compare.open")):
                css(opener).click()
                wait_until(lambda: script("return document.querySelector(arguments[0]) !== null",
                                          view), 10, view)
                scroll_through()
                wait_until(lambda: script(LOADED, ".view.open img"), 30, f"{view}'s pictures")
                fits(f"{view} at {width}px")
            client.get_active_element().send_keys(Keys.ESCAPE)
            assert script("return document.querySelectorAll('.view.open').length") == 0
        for width, paint in timings:
            print(f"\nFirefox {width}px (inner {paint['inner']}px): first grid paint "
                  f"{paint['grid']:.0f} ms after navigation (first contentful paint "
                  f"{paint['fcp'] or float('nan'):.0f} ms, DOMContentLoaded "
                  f"{paint['domContentLoaded']:.0f} ms)")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "results-grid-timings-firefox.json").write_text(json.dumps(timings, indent=1))

        # The keyboard: arrows move the one tabbable cell; Enter opens; the detail follows; Esc.
        client.set_window_rect(width=1280, height=900)
        client.navigate(base + job["url"])
        order = script("return Array.from(document.querySelectorAll('#results-grid tr.grid-row'))"
                       ".map(r => r.dataset.row)")
        first = css("#results-grid a.cell")
        first.send_keys(Keys.ARROW_RIGHT)
        active = lambda: script("return document.activeElement.id")   # noqa: E731
        assert active() == f"cell-{order[0]}-1"
        client.get_active_element().send_keys(Keys.ARROW_DOWN)
        assert active() == f"cell-{order[1]}-1"
        client.get_active_element().send_keys(Keys.END)
        assert active() == f"cell-{order[1]}-{len(METHODS) - 1}"
        client.get_active_element().send_keys(Keys.HOME)
        assert active() == f"cell-{order[1]}-0"
        client.get_active_element().send_keys(Keys.ENTER)
        detail = f"detail-{order[1]}-0"
        assert wait_until(lambda: script("const d = document.querySelector('.view.detail.open');"
                                         "return d && d.id"), 10, "the detail") == detail
        client.get_active_element().send_keys(Keys.ARROW_UP)
        assert active() == f"cell-{order[0]}-0"
        wait_until(lambda: script("const d = document.querySelector('.view.detail.open');"
                                  "return d && d.id === arguments[0]", f"detail-{order[0]}-0"),
                   10, "the detail to follow the focus")

        # Clip at max: the page re-colours the map from its .npy like the renderer.
        image = int(order[0])
        panel = job["results"][image]["visualizations"][0]["panels"][0]
        heatmap = f"#detail-{image}-0 figure[data-panel-id=p{image}-0-0] img.heatmap"
        wait_until(lambda: script(LOADED, heatmap), 30, "the detail's heatmap")
        css(f"#detail-{image}-0 figure[data-panel-id=p{image}-0-0] .clip-select "
            "option[value='100']").click()
        wait_until(lambda: script("return document.querySelector(arguments[0]).src"
                                  ".startsWith('blob:')", heatmap), 30, "the re-coloured map")
        wait_until(lambda: script(LOADED, heatmap), 30, "the re-coloured map to load")
        data = script("""const image = document.querySelector(arguments[0]);
            const canvas = document.createElement('canvas');
            canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
            canvas.getContext('2d').drawImage(image, 0, 0);
            return canvas.toDataURL('image/png');""", heatmap)
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1])))
                           .convert("RGB"))
        with urllib.request.urlopen(base + panel["array_url"], timeout=10) as response:
            values = np.load(io.BytesIO(response.read()), allow_pickle=False)
        from app.rendering import colorize

        expected = colorize(values, False, (float(values.min()), float(values.max())))
        assert (np.abs(shown.astype(int) - expected).max(axis=-1) <= 1).mean() > 0.99
        assert script("return document.querySelector(arguments[0]).textContent",
                      f"#detail-{image}-0 figure[data-panel-id=p{image}-0-0] .legend-scale") == \
            "Own scale: full range: minimum to maximum."
        client.get_active_element().send_keys(Keys.ESCAPE)
        assert script("return document.querySelectorAll('.view.open').length") == 0
        (ARTIFACTS / "firefox-results-grid.png").write_bytes(client.screenshot(format="binary"))
        assert firefox_console_errors(client, base) == []
