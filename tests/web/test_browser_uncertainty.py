"""Chromium on the demo: the cat photo's image view, opened in place on the job page, shows how
far to believe its top-1 with the top-5 -- the figures the job's JSON holds -- and its help opens
without any script error or Content-Security-Policy complaint; on the view's own page the
figures sit beside the top-5."""
from __future__ import annotations

import pytest

from tests.browser import CAT_PHOTO, page_problems, running_server
from tests.web.results_job import _run, _upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_image_view_shows_the_figures_beside_the_top5(tmp_path, chromium) -> None:
    with running_server(tmp_path) as base, \
            chromium.new_page(viewport={"width": 1280, "height": 900}) as page:
        cat = _upload(base, [(CAT_PHOTO.read_bytes(), CAT_PHOTO.name)])[0]
        job = _run(base, {"images": [cat], "visualizations": [{"name": "grad_cam"}]},
                   timeout_s=300)
        figures = job["results"][0]["uncertainty"]
        problems = page_problems(page)
        page.goto(base + job["url"])
        page.click("a.row-link")                            # opens the image's view in place
        view = page.locator(".view.compare.open")
        view.wait_for()
        table = view.locator("table.uncertainty")
        assert table.is_visible() and view.locator("table.topk").is_visible()
        text = " ".join(table.text_content().split())
        assert f"{figures['entropy']['value']:.2f} nats" in text
        top = figures["tta"]["classes"][0]
        assert f"{top['label']} {top['mean']:.2f} ± {top['std']:.2f}" in text
        # The demo (EfficientNet-Lite0) has dropout before its classifier: MC dropout runs.
        assert figures["mc_dropout"]["available"] is True and "passes" in text
        assert figures["ood"]["flag"] in text
        view.locator("details.uncertainty-help summary").click()
        assert view.locator("details.uncertainty-help dl").is_visible()

        # On the view's own page (full width): beside the top-5, not below it.
        page.goto(base + job["url"] + "/views/compare-image-0")
        topk_box = page.locator("table.topk").bounding_box()
        table_box = page.locator("table.uncertainty").bounding_box()
        assert table_box["x"] > topk_box["x"] + topk_box["width"] - 1
        assert abs(table_box["y"] - topk_box["y"]) < 40
        assert problems == [], problems
