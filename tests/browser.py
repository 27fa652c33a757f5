"""Shared helpers for the tests that drive real browsers against a real `convscope serve`.

Chromium is Debian's (``apt-get install chromium``), driven by Python Playwright. Firefox is
Debian's ESR (``apt-get install firefox-esr``), driven over its own Marionette protocol by
``marionette-driver`` (Playwright only drives its own patched Firefox, which is a download, and
geckodriver is not packaged). The browser tests skip when a browser or its driver is missing,
unless ``CONVSCOPE_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
from PIL import Image

from benchmarks.load import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"

# The walk through the product that the Chromium and Firefox tests share.
CAT_PHOTO = ROOT / "demo" / "images" / "chelsea.jpg"
CAT_CLASSES = range(281, 286)       # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking"]


FIREFOX = "/usr/bin/firefox-esr"
# A test profile: Marionette on a port of Firefox's choosing, and nothing that phones home
# (CI and users' servers are air-gapped; a hanging update or telemetry request only slows it).
FIREFOX_PREFS = {
    "marionette.port": 0,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "app.update.disabledForTesting": True,
    "extensions.update.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CONVSCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CONVSCOPE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def browser_or_skip():
    """Playwright's ``sync_playwright``, or skip (fail in CI) when it or Chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("Python playwright is not installed")
    if not os.path.exists(CHROMIUM):
        _skip_or_fail(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def page_problems(page) -> list[str]:
    """A list that collects the page's console errors and uncaught exceptions from now on."""
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error"
            and problems.append(f"console: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    return problems


def png_payload() -> bytes:
    """A real photo (the demo's coffee cup) as PNG bytes: the upload behind HOSTILE_NAME."""
    buffer = io.BytesIO()
    Image.open(ROOT / "demo" / "images" / "coffee.jpg").convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def http_status(url: str) -> int:
    """The status of a GET, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return 0


@contextlib.contextmanager
def running_server(tmp_path: Path, serve_args: Sequence[str] = (), *,
                   environment: dict[str, str] | None = None,
                   ready_timeout_s: float = 120) -> Iterator[str]:
    """`convscope serve [serve_args]` on a free loopback port with its own data directory; yields
    the base URL once /api/v1/ready answers, then stops it with SIGTERM and checks that it exited
    and logged no traceback."""
    port = free_port()
    log_path = tmp_path / "server.log"
    environ = {**os.environ, "CONVSCOPE_TORCH_THREADS": "1", "CONVSCOPE_DEVICE": "cpu",
               **(environment or {})}
    command = [sys.executable, "-m", "app.cli", "serve", *serve_args, "--port", str(port),
               "--data-dir", str(tmp_path / "data")]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=log,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while http_status(base + "/api/v1/ready") != 200:   # ready stays open even with a token
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("convscope serve did not become ready:\n"
                        + log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
    try:
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("convscope serve did not stop on SIGTERM")
    assert "Traceback" not in log_path.read_text(errors="replace")


def firefox_or_skip() -> None:
    """Skip (fail in CI) when marionette-driver or Firefox is missing."""
    try:
        import marionette_driver  # noqa: F401
    except ImportError as error:   # not installed, or a dependency missing (telnetlib on 3.13)
        _skip_or_fail(f"Python marionette-driver cannot be imported: {error}")
    if not os.path.exists(FIREFOX):
        _skip_or_fail(f"Firefox is not installed at {FIREFOX} (apt-get install firefox-esr)")


@contextlib.contextmanager
def firefox(width: int = 1400, height: int = 1000, start_timeout_s: float = 60) -> Iterator[Any]:
    """Headless Firefox with a fresh profile; yields a Marionette client with a session."""
    from marionette_driver.marionette import Marionette

    with tempfile.TemporaryDirectory(prefix="convscope-firefox-") as profile_dir:
        profile = Path(profile_dir)
        (profile / "user.js").write_text("".join(
            f"user_pref({json.dumps(name)}, {json.dumps(value)});\n"
            for name, value in FIREFOX_PREFS.items()))
        # -remote-allow-system-access: reading the browser console (console_errors) needs the
        # privileged "chrome" context.
        process = subprocess.Popen(
            [FIREFOX, "--headless", "--marionette", "-remote-allow-system-access", "--no-remote",
             "--profile", str(profile)],
            env={**os.environ, "MOZ_HEADLESS": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "MarionetteActivePort"   # written once Marionette listens
            deadline = time.monotonic() + start_timeout_s
            while not port_file.exists() or not port_file.read_text().strip():
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Firefox did not start Marionette (exit {process.poll()})")
                time.sleep(0.1)
            client = Marionette(host="127.0.0.1", port=int(port_file.read_text()))
            client.start_session()
            client.set_window_rect(width=width, height=height)
            try:
                yield client
            finally:
                if process.poll() is None:   # a crashed Firefox: keep the original error
                    client.delete_session()
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def firefox_console_errors(client: Any, origin: str) -> list[str]:
    """Errors in Firefox's console from pages under ``origin``: uncaught exceptions and CSP
    violations (nsIScriptError with the error flag, 0). Not covered: ``console.error`` calls
    (content processes keep those; convscope's scripts make none) and failed image loads (the
    tests check ``naturalWidth`` instead)."""
    with client.using_context("chrome"):
        return client.execute_script("""
            const [origin] = arguments;
            return Services.console.getMessageArray()
                .filter(m => m instanceof Ci.nsIScriptError && m.flags === 0
                             && m.sourceName.startsWith(origin))
                .map(m => `${m.category}: ${m.errorMessage} (${m.sourceName}:${m.lineNumber})`);
        """, script_args=[origin])


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)
