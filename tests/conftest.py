"""Suite-wide test settings. Area fixtures live in each tests/<area>/conftest.py."""
from __future__ import annotations

import os

# One torch thread: on 2 shared cores, 2 threads run 2-4x slower when anything else is busy.
os.environ.setdefault("CONVSCOPE_TORCH_THREADS", "1")
os.environ.setdefault("CONVSCOPE_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["CONVSCOPE_TORCH_THREADS"]))


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium for the browser tests in tests/web and tests/security: one launch per
    run, as each test opens its own page or context. Skips (fails under
    CONVSCOPE_REQUIRE_BROWSER=1) when Playwright or Chromium is missing."""
    from tests.browser import browser_or_skip, launch_chromium   # only when a test asks

    sync_playwright = browser_or_skip()
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
