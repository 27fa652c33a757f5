"""The workbench in Chromium: switching the model reloads the form for it and keeps the images
already uploaded (with their true labels) instead of silently dropping them."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.browser import page_problems, running_server
from tests.web.conftest import png_bytes, write_checkpoint_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def two_model_server(tmp_path):
    """`convscope serve` on a loopback port with two checkpoints of a tiny model."""
    directory = write_checkpoint_dir(tmp_path / "checkpoints")
    shutil.copy(directory / "tiny.pt", directory / "older.pt")
    os.utime(directory / "older.pt", (time.time() - 3600, time.time() - 3600))
    with running_server(tmp_path, [str(directory)], ready_timeout_s=60) as base:
        yield base


def test_switching_the_model_keeps_the_uploaded_images(chromium, two_model_server):
    with chromium.new_page() as page:
        problems = page_problems(page)
        page.goto(two_model_server + "/")
        page.set_input_files("#image-input", files=[
            {"name": name, "mimeType": "image/png", "buffer": png_bytes(seed=seed)}
            for seed, name in ((1, "first.png"), (2, "second.png"))])
        page.wait_for_selector(".thumb[data-image-id] >> nth=1", timeout=15_000)
        page.fill(".thumb >> nth=1 >> input.true-label", "dog")
        ids = page.eval_on_selector_all(".thumb", "items => items.map(i => i.dataset.imageId)")

        older = page.locator(".model-list li", has_text="older.pt").locator("input")
        with page.expect_navigation():
            older.check()
        assert "model=" in page.url
        assert page.locator(".model-list li", has_text="older.pt").locator(
            "input").is_checked()
        page.wait_for_selector(".thumb[data-image-id] >> nth=1", timeout=5_000)
        assert page.eval_on_selector_all(
            ".thumb", "items => items.map(i => i.dataset.imageId)") == ids
        assert page.locator(".thumb .filename").all_text_contents() == ["first.png",
                                                                         "second.png"]
        assert page.locator(".thumb >> nth=1 >> input.true-label").input_value() == "dog"
        page.check("input[name=method][value=grad_cam]")
        with page.expect_navigation(url="**/jobs/*"):
            page.click("#run-button")
        page.wait_for_selector("#results-grid", timeout=30_000)
        assert page.locator(".grid-row .filename").all_text_contents() == ["first.png",
                                                                            "second.png"]
        # Once used, the kept list is gone: a fresh workbench starts empty.
        page.goto(two_model_server + "/")
        assert page.locator(".thumb").count() == 0
    assert problems == []
