"""The README's promises: `make demo` serves the demo, and the configuration table is complete."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from benchmarks.load import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_serves_the_demo_model(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, CONVSCOPE_PORT=str(port), CONVSCOPE_DATA_DIR=str(tmp_path / "data"))
    env.pop("CONVSCOPE_CHECKPOINT_DIR", None)
    process = subprocess.Popen(["make", "--no-print-directory", "demo"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode(errors="replace")
            try:
                if requests.get(f"{base}/api/v1/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "make demo did not become ready in 120 s"
            time.sleep(0.5)
        health = requests.get(f"{base}/api/v1/health", timeout=5).json()
        assert health["status"] == "ok"
        models = requests.get(f"{base}/api/v1/models", timeout=5).json()["models"]
        assert [m["architecture"] for m in models if m["ok"]] == ["efficientnet-lite0"] or \
            any("efficientnet" in (m["architecture"] or "") for m in models)
        page = requests.get(base + "/", timeout=10)
        assert page.status_code == 200 and "efficientnet" in page.text.lower()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_readme_documents_every_setting() -> None:
    from app.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [name for name, _default, _meaning in Settings().as_table()
               if f"`{name}`" not in readme and name != "CONVSCOPE_TESTING"]
    assert not missing, f"README's configuration table lacks {missing}"


def test_readme_has_exactly_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make (\w+)", setup, flags=re.M)
    assert commands == ["demo", "test"]
