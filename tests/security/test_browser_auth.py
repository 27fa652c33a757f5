"""Authentication in a real browser: `convscope serve` with a token and a tiny model, driven by
Chromium. The login page sets the cookie, the workbench script's API calls (session cookie +
X-CSRF-Token header) upload and run a job, and signing out closes the pages again."""
from __future__ import annotations

import pytest

from tests.browser import running_server
from tests.security.conftest import TOKEN
from tests.web.conftest import png_bytes, write_checkpoint_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def token_server(tmp_path):
    """`convscope serve` on a loopback port with CONVSCOPE_AUTH_TOKEN and a tiny model."""
    directory = write_checkpoint_dir(tmp_path / "checkpoints")
    with running_server(tmp_path, [str(directory)], ready_timeout_s=60,
                        environment={"CONVSCOPE_AUTH_TOKEN": TOKEN}) as base:
        yield base


def test_login_upload_run_and_sign_out_in_chromium(chromium, token_server):
    problems: list[str] = []
    refused: list[str] = []
    with chromium.new_context() as context:
        page = context.new_page()
        # Page errors only, not page_problems: Chromium logs the wrong token's 401 below to
        # the console as a failed resource load.
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("response", lambda response: response.status in (401, 403)
                and "/login" not in response.url and refused.append(response.url))

        page.goto(token_server + "/models")
        assert "/login" in page.url
        page.fill("#token", "wrong-token-wrong-token")
        page.click("button[type=submit]")
        assert page.locator(".alert").text_content().strip().startswith("E_UNAUTHORIZED")
        refused.clear()                      # the wrong token's 401 was the point

        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url("**/models")
        [cookie] = [c for c in context.cookies() if c["name"] == "convscope_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["expires"] > 0

        page.goto(token_server + "/")
        page.set_input_files("#image-input", files=[{
            "name": "red.png", "mimeType": "image/png", "buffer": png_bytes(seed=5)}])
        page.wait_for_selector(".thumb[data-image-id]", timeout=20_000)
        page.check("input[name=method][value=grad_cam]")
        page.click("#run-button")
        page.wait_for_url("**/jobs/*", timeout=20_000)
        page.wait_for_selector("#job[data-finished=true]", timeout=60_000)
        assert page.text_content("#job-status") == "done"
        overlays = page.evaluate("Array.from(document.querySelectorAll('img.grid-overlay'))"
                                 ".map(i => i.naturalWidth)")
        assert overlays and all(width > 0 for width in overlays)

        page.click(".sign-out button")
        page.wait_for_url("**/login")
        page.goto(token_server + "/")
        assert "/login" in page.url
    assert problems == [], problems
    assert refused == [], refused
