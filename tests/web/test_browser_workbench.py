"""The workbench in Chromium: switching the model reloads the form for it and keeps the images
already uploaded (with their true labels) instead of silently dropping them."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.web.conftest import png_bytes, write_checkpoint_dir
from tests.web.test_browser import CHROMIUM, ROOT, _browser_or_skip, _free_port, _get

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def two_model_server(tmp_path):
    """`convscope serve` on a loopback port with two checkpoints of a tiny model."""
    directory = write_checkpoint_dir(tmp_path / "checkpoints")
    shutil.copy(directory / "tiny.pt", directory / "older.pt")
    os.utime(directory / "older.pt", (time.time() - 3600, time.time() - 3600))
    port = _free_port()
    log_path = tmp_path / "server.log"
    environ = {**os.environ, "CONVSCOPE_TORCH_THREADS": "1", "CONVSCOPE_DEVICE": "cpu"}
    command = [sys.executable, "-m", "app.cli", "serve", str(directory), "--port", str(port),
               "--data-dir", str(tmp_path / "data")]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=log,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while _get(base + "/api/v1/ready") != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("convscope serve did not become ready:\n"
                        + log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
    yield base
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    assert "Traceback" not in log_path.read_text(errors="replace")


def test_switching_the_model_keeps_the_uploaded_images(two_model_server):
    sync_playwright = _browser_or_skip()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error"
                    and problems.append(f"console: {message.text}"))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
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
            page.wait_for_selector("#grid", timeout=30_000)
            assert page.locator(".image-result .filename").all_text_contents() != []
            # Once used, the kept list is gone: a fresh workbench starts empty.
            page.goto(two_model_server + "/")
            assert page.locator(".thumb").count() == 0
        finally:
            browser.close()
    assert problems == []
