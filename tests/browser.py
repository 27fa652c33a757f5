"""Shared helpers for the tests that drive real Chromium against a real `convscope serve`.

Chromium is Debian's (``apt-get install chromium``), driven by Python Playwright; the browser
tests skip when either is missing, unless ``CONVSCOPE_REQUIRE_BROWSER=1`` (CI) makes that a
failure.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking"]


def browser_or_skip():
    """Playwright's ``sync_playwright``, or skip (fail in CI) when it or Chromium is missing."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "Python playwright is not installed"
        sync_playwright = None
    if reason is None and not os.path.exists(CHROMIUM):
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CONVSCOPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CONVSCOPE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_playwright


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
