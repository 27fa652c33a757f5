"""Ingest memory, measured in the gunicorn worker process (issue 13, item 2).

A 143 KB all-zero 7000x7000 PNG used to cost ~375 MB resident per upload, and eight at once
added 2.5 GB. Now decodes share a budget (CONVSCOPE_DECODE_BUDGET_MB): eight concurrent
49-megapixel uploads raise the worker's peak resident memory by less than 600 MB. With the
budget opened wide the same traffic goes far over, which shows the budget is what bounds it.
"""
from __future__ import annotations

import concurrent.futures
import io
from pathlib import Path

import pytest
import requests
from PIL import Image

from app.ingest import decode_cost_bytes, ingest_image
from benchmarks.load import gunicorn_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SIDE = 7000                     # 49 megapixels, just under the 50-megapixel limit
UPLOADS = 8
GOAL_MB = 600


def big_png(seed: int) -> bytes:
    image = Image.new("RGB", (SIDE, SIDE))
    image.putpixel((seed, seed), (seed, 255, 0))      # distinct files, ~140 KB each
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def peak_increase_mb(env: dict[str, str], tmp_path: Path) -> tuple[float, list[requests.Response]]:
    """Worker peak RSS during 8 concurrent 49-MP uploads, minus its RSS just before."""
    files = [big_png(seed) for seed in range(UPLOADS)]
    with gunicorn_server(env, data_dir=tmp_path) as server:
        (worker,) = server.worker_pids()
        warm = requests.post(server.base_url + "/api/v1/images", timeout=60,
                             files={"image": ("warm.png", _small_png())})
        assert warm.status_code == 201, warm.text
        Path(f"/proc/{worker}/clear_refs").write_text("5")     # reset VmHWM to VmRSS
        before = kib(worker, "VmRSS")

        def upload(data: bytes) -> requests.Response:
            return requests.post(server.base_url + "/api/v1/images", timeout=120,
                                 files={"image": ("big.png", data, "image/png")})

        with concurrent.futures.ThreadPoolExecutor(UPLOADS) as pool:
            responses = list(pool.map(upload, files))
        peak = kib(worker, "VmHWM")
    return (peak - before) / 1024, responses


def _small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_eight_concurrent_49_megapixel_uploads_stay_under_600_mb(tmp_path):
    increase, responses = peak_increase_mb({}, tmp_path)
    statuses = [response.status_code for response in responses]
    assert increase < GOAL_MB, f"peak RSS rose by {increase:.0f} MB ({statuses})"
    # Every upload was stored, or refused as busy with a Retry-After (never swapped).
    for response in responses:
        assert response.status_code == 201 or (
            response.status_code == 503 and response.json()["error"]["code"] == "E_BUSY"
            and response.headers.get("Retry-After")), response.text
    assert statuses.count(201) >= 1
    print(f"peak RSS increase {increase:.0f} MB, statuses {statuses}")


def test_without_the_budget_the_same_uploads_go_over(tmp_path):
    """The control: a budget wide enough for all eight at once lets memory go far past the
    goal, so the bound above comes from the budget, not from luck."""
    increase, responses = peak_increase_mb({"CONVSCOPE_DECODE_BUDGET_MB": "8192"}, tmp_path)
    assert all(response.status_code == 201 for response in responses)
    assert increase > GOAL_MB, f"peak RSS rose by only {increase:.0f} MB"


@pytest.mark.parametrize("mode, size", [("RGB", (7000, 7000)), ("P", (7000, 5000)),
                                        ("RGBA", (4000, 3000)), ("I;16", (4000, 3000))])
def test_the_budget_estimate_covers_the_measured_peak(mode, size, tmp_path):
    """decode_cost_bytes is what the budget reserves: it must not undercount. Measured in a
    fresh subprocess (VmHWM after the ingest minus VmRSS before it)."""
    import subprocess
    import sys

    script = f"""
import io, numpy as np
from pathlib import Path
from PIL import Image
from app.ingest import ingest_image
mode, size = {mode!r}, {size!r}
image = (Image.fromarray(np.zeros(size[::-1], np.uint16)) if mode == "I;16"
         else Image.new(mode, size))
buffer = io.BytesIO(); image.save(buffer, "PNG"); data = buffer.getvalue(); del image, buffer
def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
ingest_image(data, "x.png")
print((kib("VmHWM") - before) * 1024)
"""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    measured = int(result.stdout.split()[-1])
    decoded_mode = "I;16" if mode == "I;16" else mode
    estimate = decode_cost_bytes(decoded_mode, *size)
    assert measured <= estimate, f"measured {measured >> 20} MB > estimate {estimate >> 20} MB"


def test_identical_files_in_one_request_decode_once(monkeypatch):
    """16 copies of one file cost one decode (the issue's 11 s of CPU for 16 copies)."""
    from app.views import uploads

    calls = []

    def counting(data, name, **kwargs):
        calls.append(name)
        return ingest_image(data, name, **kwargs)

    monkeypatch.setattr("app.ingest.ingest_image", counting)
    stored = []
    images = type("Images", (), {"put": lambda self, image: stored.append(image) or image})()
    from flask import Flask
    from werkzeug.datastructures import FileStorage

    with Flask("t").app_context():
        files = [FileStorage(io.BytesIO(_small_png()), filename=f"copy{n}.png") for n in range(16)]
        uploads.store_uploads(files, images, max_files=16)
    assert len(calls) == 1 and len(stored) == 16
    assert [image.filename for image in stored] == [f"copy{n}.png" for n in range(16)]
