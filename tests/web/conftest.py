"""Fixtures for the web tests: a checkpoint directory with a tiny model, and apps on it.

Each test gets fresh apps on its own ``tmp_path`` (data directory included); every app built
here is shut down afterwards so no executor thread outlives its test.
"""
from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from PIL import Image

from tests.web import tiny_models
from tests.web.tiny_models import CLASS_NAMES

TERMINAL = {"done", "failed", "cancelled"}


def write_checkpoint_dir(directory: Path, *, factory: str = "TinyNet", size: int = 32,
                         broken_file: bool = False) -> Path:
    """A checkpoint directory: convscope.toml naming a tiny factory, labels.txt, tiny.pt."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "convscope.toml").write_text(
        "[model]\n"
        f'factory = "tests.web.tiny_models:{factory}"\n'
        "[preprocess]\n"
        f"input_size = [{size}, {size}]\n"
        "resize = 0\n"
        "mean = [0.5, 0.5, 0.5]\n"
        "std = [0.5, 0.5, 0.5]\n")
    (directory / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    torch.manual_seed(0)
    torch.save(getattr(tiny_models, factory)().state_dict(), directory / "tiny.pt")
    if broken_file:
        (directory / "broken.pt").write_bytes(b"this is not a checkpoint")
    return directory


def png_bytes(size: tuple[int, int] = (40, 32), colour: tuple[int, int, int] = (200, 30, 30),
              seed: int | None = None) -> bytes:
    image = Image.new("RGB", size, colour)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator,
                               dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    return write_checkpoint_dir(tmp_path / "checkpoints", broken_file=True)


@pytest.fixture
def make_app(tmp_path: Path, checkpoint_dir: Path) -> Iterator[Callable[..., Any]]:
    """Build an app: ``make_app(**settings)``; defaults to the tiny checkpoint directory and a
    data directory under ``tmp_path``. Waits until ready unless ``wait=False``."""
    from app import create_app
    from app.catalog import ModelCatalog

    built = []

    def build(*, wait: bool = True, catalog: Any = None, directory: Path | None = None,
              **settings: Any):
        directory = directory or checkpoint_dir
        config = {"data_dir": tmp_path / "data", "checkpoint_dir": directory, "device": "cpu",
                  "testing": True, **settings}
        # As the factory builds it (rescanned by the executor only), except settle_seconds=0:
        # files written by the test are complete, so list them at once.
        config["catalog"] = catalog or ModelCatalog(directory, torch.device("cpu"),
                                                    settle_seconds=0,
                                                    rescan_seconds=float("inf"))
        app = create_app(config)
        built.append(app)
        if wait:
            wait_ready(app.test_client())
        return app

    yield build
    for app in built:
        app.extensions["convscope"].shutdown(timeout=10)


@pytest.fixture
def held_executor(make_app):
    """An app whose executor is held inside its first job until ``gate`` is set:
    ``(app, client, executor, image id, gate, started)``."""
    app = make_app()
    client = app.test_client()
    executor = app.extensions["convscope"].executor
    gate, started = threading.Event(), threading.Event()
    original = executor._start
    executor._start = lambda job: (started.set(), gate.wait(10), original(job))[-1]
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    yield app, client, executor, image, gate, started
    gate.set()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def wait_ready(client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/api/v1/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("the app did not become ready")


def wait_job(client, job_id: str, timeout: float = 60.0,
             until: Callable[[dict], bool] | None = None) -> dict:
    """Poll the job until it is terminal (or ``until(job)``); return the last record."""
    until = until or (lambda job: job["status"] in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.json
        job = response.json
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {job['status']} after {timeout} s")
        time.sleep(0.02)


def upload(client, *files: tuple[bytes, str]) -> list[dict]:
    response = client.post("/api/v1/images",
                           data={"image": [(io.BytesIO(data), name) for data, name in files]},
                           content_type="multipart/form-data")
    assert response.status_code == 201, response.json
    return response.json["images"]


def submit(client, images: list[str], methods: list[dict] | None = None, **fields: Any):
    body = {"model": "latest", "images": images,
            "visualizations": methods or [{"name": "grad_cam"}], **fields}
    return client.post("/api/v1/jobs", json=body)


def run_job(client, images: list[str], methods: list[dict] | None = None, **fields: Any) -> dict:
    response = submit(client, images, methods, **fields)
    assert response.status_code == 202, response.json
    return wait_job(client, response.json["id"])


def csrf_from(html: bytes) -> str:
    match = re.search(rb'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1).decode()
