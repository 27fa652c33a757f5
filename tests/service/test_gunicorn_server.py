"""The service under real gunicorn (gunicorn.conf.py, the demo model on CPU).

Body limits, graceful shutdown with a running job, a killed worker, and the quick load test.
Each test starts gunicorn (a few seconds), so they are marked slow.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from benchmarks.load import gunicorn_server, heap_at_rest_mb, main as load_main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LIMIT_MB = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with gunicorn_server({"CONVSCOPE_MAX_REQUEST_MB": str(LIMIT_MB)},
                         data_dir=tmp_path_factory.mktemp("data")) as running:
        yield running


@pytest.mark.parametrize("megabytes", [2, 24])
def test_api_upload_over_the_limit_is_a_413_not_a_reset(server, megabytes):
    body = os.urandom(megabytes * 1024 * 1024)
    session = requests.Session()
    response = session.post(server.base_url + "/api/v1/images",
                            files={"image": ("big.png", body, "image/png")}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "E_PAYLOAD_TOO_LARGE"
    # The same connection (or a new one) keeps working: the server did not drop us.
    assert session.get(server.base_url + "/api/v1/health", timeout=10).status_code == 200


def test_form_upload_over_the_limit_gets_a_readable_html_page(server):
    body = os.urandom(3 * 1024 * 1024)
    response = requests.post(server.base_url + "/", files={"image": ("big.jpg", body)},
                             headers={"Accept": "text/html"}, timeout=60)
    assert response.status_code == 413
    assert response.headers["Content-Type"].startswith("text/html")
    text = re.sub(r"<[^>]+>", " ", response.text)
    assert "too large" in text.lower() and "E_PAYLOAD_TOO_LARGE" in text
    assert "Traceback" not in response.text and "/work" not in response.text


def test_raw_oversized_request_reads_a_complete_response(server):
    """A client that sends the whole oversized body, then reads: it must get the 413 response,
    not ECONNRESET (the server reads or discards the body instead of closing on unread data)."""
    size = 16 * 1024 * 1024
    host, port = server.base_url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            f"POST /api/v1/images HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {size}\r\n"
            "Connection: close\r\n\r\n".encode())
        chunk = b"\0" * 65536
        for _ in range(size // len(chunk)):
            connection.sendall(chunk)
        received = b""
        while data := connection.recv(65536):
            received += data
    assert received.startswith(b"HTTP/1.1 413")
    assert b"E_PAYLOAD_TOO_LARGE" in received


def test_server_is_still_up_and_healthy(server):
    assert requests.get(server.base_url + "/api/v1/ready", timeout=10).status_code == 200
    assert len(server.worker_pids()) == 1


def _submit_slow_occlusion(base_url: str) -> str:
    from tests.service import images

    data = images.encode(images.noise((224, 224)), "PNG")
    upload = requests.post(base_url + "/api/v1/images", files={"image": ("x.png", data)},
                           timeout=30)
    assert upload.status_code == 201, upload.text
    image_id = upload.json()["images"][0]["id"]
    job = requests.post(base_url + "/api/v1/jobs", json={
        "model": "latest", "images": [image_id],
        "visualizations": [{"name": "occlusion", "params": {"window": 16, "stride": 8}}],
        "targets": ["predicted"]}, timeout=30)
    assert job.status_code == 202, job.text
    return job.json()["id"]


def _wait_for_status(base_url: str, job_id: str, wanted: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = requests.get(f"{base_url}/api/v1/jobs/{job_id}", timeout=10).json()
        if record["status"] in wanted or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def test_sigterm_with_a_running_job_exits_cleanly_and_records_it_cancelled(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with gunicorn_server(data_dir=data_dir) as running:
        job_id = _submit_slow_occlusion(running.base_url)
        record = _wait_for_status(running.base_url, job_id, {"running"}, 60)
        assert record["status"] == "running"
        time.sleep(1.0)                          # inside the occlusion loop
        started = time.monotonic()
        exit_code = running.stop(timeout=60)
        stopped_in = time.monotonic() - started
        log = running.log()
    assert exit_code == 0, log[-2000:]
    assert stopped_in < 30, f"took {stopped_in:.1f} s"
    assert "Shutting down: Master" in log and "Traceback" not in log

    with gunicorn_server(data_dir=data_dir) as restarted:   # the record survived the restart
        record = requests.get(f"{restarted.base_url}/api/v1/jobs/{job_id}", timeout=10).json()
    assert record["status"] == "cancelled"
    assert record["error"]["code"] == "E_CANCELLED"


def test_a_worker_killed_with_sigkill_is_replaced_and_answers_within_seconds(tmp_path):
    with gunicorn_server(data_dir=tmp_path) as running:
        (victim,) = running.worker_pids()
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        running.wait_ready(timeout=60)
        recovered_in = time.monotonic() - killed
        workers = running.worker_pids()
        assert len(workers) == 1 and workers[0] != victim
        assert requests.get(running.base_url + "/api/v1/health", timeout=10).status_code == 200
    assert recovered_in < 30, f"took {recovered_in:.1f} s"


def test_quick_load_run_passes(capsys):
    """4 clients x 15 s of the cheap mix: no unexpected 5xx, every accepted job done, and the
    workers' heap at rest as after the warm-up (within 64 MB, the 2-minute run's tolerance).
    Before the allocator settings of the image the heap grew 130-780 MB in such a run."""
    status = load_main(["--quick"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "RESULT: OK" in output
    assert re.search(r"jobs: [1-9]\d* accepted", output), output


class _OneProcess:
    """Stands in for the server: heap_at_rest_mb reads the workers' pids from it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def worker_pids(self) -> list[int]:
        return [self.pid]


def test_the_heap_at_rest_sees_memory_a_process_keeps():
    """The measurement the load test judges by sees 200 MB that a process allocated and kept."""
    keeper = subprocess.Popen(
        [sys.executable, "-c", "import sys\nkept = []\nfor line in sys.stdin:\n"
         "    kept.append(bytearray(200 * 2**20)); print('ok', flush=True)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        server = _OneProcess(keeper.pid)
        before = heap_at_rest_mb(server, settle=0.2, span=0.5)
        keeper.stdin.write("grow\n")
        keeper.stdin.flush()
        assert keeper.stdout.readline().strip() == "ok"
        after = heap_at_rest_mb(server, settle=0.2, span=0.5)
    finally:
        keeper.kill()
        keeper.wait()
    assert 190 <= after - before <= 215, (before, after)
