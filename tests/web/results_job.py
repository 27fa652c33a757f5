"""A finished job of 16 images x all 7 methods on a tiny model, for the results-page browser
tests (Chromium and Firefox): made over plain HTTP against a running `convscope serve`.

Four images get a true label that is not their top-1 class, so the grid has failure rows with
the predicted and the true class side by side. Parameters are the cheapest each method allows
(the page, not the maps, is under test), so the whole job takes seconds on the tiny model.
"""
from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.web.conftest import png_bytes, write_checkpoint_dir
from tests.web.tiny_models import CLASS_NAMES

IMAGES = 16
# The job with its faithfulness scores (on by default, shown as a badge on every map's panel)
# needs about 20,000 model evaluations, over the default job limit of 10,000.
SERVER_ENVIRONMENT = {"CONVSCOPE_MAX_JOB_COST": "40000"}
FAILURES = (1, 6, 11, 14)           # images given a wrong true label
METHODS = [
    {"name": "saliency"},
    {"name": "integrated_gradients", "params": {"steps": 4}},
    {"name": "occlusion", "params": {"window": 8, "stride": 8}},
    {"name": "partial_occlusion", "params": {"positions": 2, "window_fraction": 0.5,
                                             "top_k": 2}},
    {"name": "cam"},
    {"name": "grad_cam"},
    {"name": "guided_grad_cam"},
]


def checkpoint_dir(tmp_path: Path) -> Path:
    """The tiny 32-px model (every method runs on it)."""
    return write_checkpoint_dir(tmp_path / "checkpoints")


def _request(url: str, data: bytes | None = None, content_type: str | None = None) -> Any:
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _upload(base: str, files: list[tuple[bytes, str]]) -> list[str]:
    boundary = uuid.uuid4().hex
    parts = []
    for data, name in files:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                     f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n".encode()
                     + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    answer = _request(base + "/api/v1/images", body, f"multipart/form-data; boundary={boundary}")
    return [image["id"] for image in answer["images"]]


def _run(base: str, body: dict[str, Any], timeout_s: float = 240) -> dict[str, Any]:
    job_id = _request(base + "/api/v1/jobs", json.dumps(body).encode(), "application/json")["id"]
    job = _request(base + f"/api/v1/jobs/{job_id}")
    deadline = time.monotonic() + timeout_s
    while job["status"] not in ("done", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {job['status']} after {timeout_s} s")
        time.sleep(0.3)
        job = _request(base + f"/api/v1/jobs/{job_id}")
    assert job["status"] == "done", job.get("error")
    return job


def make_results_job(base: str) -> dict[str, Any]:
    """Upload 16 images, find their top-1 classes, and run every method with four failure
    cases; returns the finished job's JSON (its ``url`` is the page)."""
    images = _upload(base, [(png_bytes(size=(40, 32), seed=100 + n), f"photo-{n:02d}.png")
                            for n in range(IMAGES)])
    first = _run(base, {"images": images, "visualizations": [{"name": "cam"}]})
    predicted = {result["image"]: result["predictions"][0]["index"]
                 for result in first["results"]}
    true_labels = {images[n]: CLASS_NAMES[(predicted[images[n]] + 1) % len(CLASS_NAMES)]
                   for n in FAILURES}
    job = _run(base, {"images": images, "visualizations": METHODS, "true_labels": true_labels})
    assert sum(result["failure"] for result in job["results"]) == len(FAILURES)
    return job
