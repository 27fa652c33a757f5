"""The Timeline page in Chromium on the demo model: a checkpoint directory holding the demo's
weights (epoch 10) and a generated earlier checkpoint (epoch 2: the same network with a
scrambled classifier, as if it had not learned the classes yet), with mtimes that say the
reverse. Run a timeline from the form, read the filmstrip (training order, a prediction under
each frame, every frame loaded), compare the two checkpoints (difference map), then write a new
checkpoint while the page is open: the page announces it without a reload, and extending the
timeline reuses what was computed. ``CONVSCOPE_UPDATE_SCREENSHOT=1`` refreshes
``docs/screenshot-timeline.png``."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from model_adapters.checkpoint_file import read_weights
from model_adapters.config import read_config
from tests.browser import ARTIFACTS, ROOT, page_problems, running_server, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _demo_state() -> dict[str, torch.Tensor]:
    return read_weights(read_config(ROOT / "demo").weights_path())


def _earlier(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The demo network with its classifier scrambled: 'before it learned the classes'."""
    generator = torch.Generator().manual_seed(seed)
    changed = dict(state)
    for name in [name for name in state if name.startswith("_fc.")]:
        tensor = state[name]
        changed[name] = tensor[torch.randperm(tensor.shape[0], generator=generator)].clone()
    return changed


@pytest.fixture
def run_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    config = (ROOT / "demo" / "convscope.toml").read_text()
    (directory / "convscope.toml").write_text(
        "\n".join(line for line in config.splitlines() if not line.startswith("weights")))
    state = _demo_state()
    torch.save({"epoch": 10, "global_step": 5000, "state_dict": state}, directory / "last.pt")
    torch.save({"epoch": 2, "global_step": 1000, "state_dict": _earlier(state, 0)},
               directory / "snapshot.pt")
    now = time.time()
    os.utime(directory / "last.pt", (now - 600, now - 600))       # mtimes say the reverse
    os.utime(directory / "snapshot.pt", (now - 300, now - 300))
    return directory


def test_the_timeline_page_in_chromium(chromium, tmp_path, run_directory: Path) -> None:
    with running_server(tmp_path, [str(run_directory)]) as base, \
            chromium.new_page(viewport={"width": 1400, "height": 1100}) as page:
        problems = page_problems(page)
        page.goto(base + "/timelines")
        rows = page.locator("table.checkpoints tbody tr")
        assert rows.count() == 2
        assert "snapshot.pt" in rows.nth(0).text_content()      # epoch 2 first
        page.click("#timeline-submit")
        page.wait_for_url("**/timelines/*", timeout=30_000)
        page.wait_for_selector("#timeline[data-finished=true]", timeout=240_000)
        assert page.text_content("#timeline-status") == "done"

        frames = page.locator("figure.filmstrip").first.locator("li.frame")
        assert frames.count() == 2
        assert "snapshot.pt" in frames.nth(0).text_content()
        assert "last.pt" in frames.nth(1).text_content()
        # The trained checkpoint calls the demo photo a cat (ImageNet 281-285).
        last = frames.nth(1).locator(".frame-prediction").text_content()
        assert re.search(r"cat|tabby", last, re.IGNORECASE), last
        for number in range(2):
            image = frames.nth(number).locator("img")
            wait_until(lambda image=image: image.evaluate(
                "img => img.complete && img.naturalWidth > 0"), 30, "a frame to load")
        assert page.locator("svg.chart").count() == 1

        page.click("details.compare summary")
        difference = page.locator("img.difference").first
        difference.scroll_into_view_if_needed()
        wait_until(lambda: difference.evaluate("img => img.complete && img.naturalWidth > 0"),
                   30, "the difference map to load")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "timeline-chromium.png"), full_page=True)
        if os.environ.get("CONVSCOPE_UPDATE_SCREENSHOT") == "1":
            page.evaluate("() => window.scrollTo(0, 0)")
            page.screenshot(path=str(ROOT / "docs" / "screenshot-timeline.png"), full_page=True)

        # A training run writes a new checkpoint: the open page says so, without a reload.
        torch.save({"epoch": 6, "global_step": 3000, "state_dict": _earlier(_demo_state(), 1)},
                   run_directory / "epoch_06.pt")
        page.wait_for_selector("#new-checkpoints:not([hidden])", timeout=60_000)
        assert "epoch_06.pt" in page.text_content("#new-checkpoints-text")
        first_url = page.url
        with page.expect_navigation(timeout=30_000):
            page.click("#new-checkpoints button[type=submit]")
        assert page.url != first_url
        page.wait_for_selector("#timeline[data-finished=true]", timeout=240_000)
        frames = page.locator("figure.filmstrip").first.locator("li.frame")
        wait_until(lambda: frames.count() == 3, 30, "three frames")
        assert [name in frames.nth(n).text_content() for n, name in
                enumerate(("snapshot.pt", "epoch_06.pt", "last.pt"))] == [True] * 3
        assert int(page.text_content("#cache-hits")) >= 4    # two checkpoints from the store
        assert problems == []
