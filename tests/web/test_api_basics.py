"""Health, readiness, models, visualizations, images: every route, status and error code."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from tests.web.conftest import png_bytes, upload

HEX64 = "0" * 64


def test_health_is_cheap_and_reports_version_and_device(client):
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "ok" and body["device"] == "cpu"
    from app import __version__
    assert body["version"] == __version__


class _BlockingCatalog:
    """A catalog whose first scan waits for a gate: readiness must wait for it."""

    def __init__(self, inner):
        self.inner, self.gate = inner, threading.Event()

    def entries(self):
        self.gate.wait(10)
        return self.inner.entries()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_ready_is_503_until_catalog_scanned_and_while_shutting_down(make_app, checkpoint_dir):
    import torch

    from app.catalog import ModelCatalog

    catalog = _BlockingCatalog(ModelCatalog(checkpoint_dir, torch.device("cpu"), settle_seconds=0))
    app = make_app(catalog=catalog, wait=False)
    client = app.test_client()
    response = client.get("/api/v1/ready")
    assert response.status_code == 503
    assert response.json["error"]["code"] == "E_NOT_READY"
    assert response.headers["Retry-After"]
    assert client.get("/api/v1/health").status_code == 200      # liveness stays up
    catalog.gate.set()
    from tests.web.conftest import wait_ready
    wait_ready(client)
    assert client.get("/api/v1/ready").json["status"] == "ready"
    app.extensions["convscope"].shutdown()
    response = client.get("/api/v1/ready")
    assert response.status_code == 503 and response.json["error"]["code"] == "E_NOT_READY"


def test_models_lists_good_and_broken_files_with_latest(client):
    models = client.get("/api/v1/models").json["models"]
    by_file = {model["file"]: model for model in models}
    assert set(by_file) == {"tiny.pt", "broken.pt"}
    good, broken = by_file["tiny.pt"], by_file["broken.pt"]
    for model in models:
        assert set(model) >= {"id", "file", "latest", "ok", "architecture", "num_classes",
                              "input_size", "modified", "error"}
    assert good["ok"] and good["latest"] and good["num_classes"] == 4 and good["error"] is None
    assert not broken["ok"] and not broken["latest"]
    assert broken["error"]["code"].startswith("E_CHECKPOINT")
    assert "/" not in good["id"] and good["id"] != "tiny.pt"      # ids are opaque


def test_model_detail_and_unknown_model(client):
    model_id = next(m["id"] for m in client.get("/api/v1/models").json["models"] if m["ok"])
    detail = client.get(f"/api/v1/models/{model_id}").json
    assert detail["sha256"] and detail["cam_layers"] and detail["parameters"] > 0
    response = client.get("/api/v1/models/nope")
    assert response.status_code == 404 and response.json["error"]["code"] == "E_UNKNOWN_MODEL"


def test_visualizations_describe_params_and_model_choices(client):
    body = client.get("/api/v1/visualizations").json
    names = [v["name"] for v in body["visualizations"]]
    assert set(names) >= {"saliency", "integrated_gradients", "occlusion", "partial_occlusion",
                          "cam", "grad_cam", "guided_grad_cam"}
    for visualization in body["visualizations"]:
        assert set(visualization) >= {"name", "title", "description", "reference", "params"}
        for param in visualization["params"]:
            assert set(param) >= {"name", "kind", "default", "min", "max", "choices", "label",
                                  "help"}
    tiny = client.get("/api/v1/models").json["models"]
    model_id = next(m["id"] for m in tiny if m["ok"])
    with_model = client.get(f"/api/v1/visualizations?model={model_id}").json["visualizations"]
    grad_cam = next(v for v in with_model if v["name"] == "grad_cam")
    layer = next(p for p in grad_cam["params"] if p["name"] == "layer")
    assert layer["choices"] and all(choice.startswith("features") for choice in layer["choices"])
    assert grad_cam["supported"] is True
    response = client.get("/api/v1/visualizations?model=nope")
    assert response.status_code == 404 and response.json["error"]["code"] == "E_UNKNOWN_MODEL"


def test_upload_gives_content_ids_and_serves_normalized_png(client):
    data = png_bytes(seed=1)
    first = upload(client, (data, "a.png"))[0]
    again = upload(client, (data, "b.png"), (png_bytes(seed=2), "c.png"))
    assert set(first) == {"id", "filename", "width", "height"}
    assert first["id"] == again[0]["id"] != again[1]["id"]
    assert (first["width"], first["height"]) == (40, 32)
    response = client.get(f"/api/v1/images/{first['id']}")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response.headers["Content-Security-Policy"]
    image = Image.open(io.BytesIO(response.data))
    assert image.size == (40, 32) and image.mode == "RGB"


@pytest.mark.parametrize("data, name, status, code", [
    (b"", "empty.png", 400, "E_IMAGE_EMPTY"),
    (b"<html><script>alert(1)</script></html>", "page.png", 415, "E_IMAGE_UNSUPPORTED"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "x.svg", 415, "E_IMAGE_UNSUPPORTED"),
    (png_bytes()[:60], "truncated.png", 400, "E_IMAGE_CORRUPT"),
])
def test_bad_uploads_have_specific_codes(client, data, name, status, code):
    response = client.post("/api/v1/images", data={"image": (io.BytesIO(data), name)},
                           content_type="multipart/form-data")
    assert response.status_code == status
    assert response.json["error"]["code"] == code
    assert response.json["error"]["fields"]["image"] == "file 1 of 1"
    assert "Traceback" not in response.get_data(as_text=True)


def test_upload_without_file_and_with_too_many_files(make_app):
    client = make_app(max_files_per_request=2).test_client()
    response = client.post("/api/v1/images", data={}, content_type="multipart/form-data")
    assert response.status_code == 400 and response.json["error"]["code"] == "E_BAD_REQUEST"
    files = [(io.BytesIO(png_bytes(seed=i)), f"{i}.png") for i in range(3)]
    response = client.post("/api/v1/images", data={"image": files},
                           content_type="multipart/form-data")
    assert response.status_code == 413 and response.json["error"]["code"] == "E_TOO_MANY_FILES"


def test_body_over_the_limit_is_413(make_app):
    client = make_app(max_request_mb=0.01).test_client()
    big = np.random.default_rng(0).integers(0, 255, 30000, dtype=np.uint8).tobytes()
    response = client.post("/api/v1/images", data={"image": (io.BytesIO(big), "big.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 413
    assert response.json["error"]["code"] == "E_PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("image_id", [HEX64, "nope", "..", "..%2F..%2Fetc%2Fpasswd",
                                      "%2e%2e%252f", "0" * 63 + "g"])
def test_unknown_or_hostile_image_ids_are_404(client, image_id):
    response = client.get(f"/api/v1/images/{image_id}")
    assert response.status_code == 404
    assert response.json["error"]["code"] == "E_NOT_FOUND"


def test_a_new_checkpoint_is_listed_as_latest_while_the_server_runs(client, checkpoint_dir):
    import os
    import shutil
    import time

    before = {m["file"] for m in client.get("/api/v1/models").json["models"]}
    assert "epoch_2.pt" not in before
    shutil.copy(checkpoint_dir / "tiny.pt", checkpoint_dir / "epoch_2.pt")
    later = time.time() + 5
    os.utime(checkpoint_dir / "epoch_2.pt", (later, later))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        models = client.get("/api/v1/models").json["models"]
        if any(m["file"] == "epoch_2.pt" for m in models):
            break
        time.sleep(0.1)
    latest = [m["file"] for m in models if m["latest"]]
    assert latest == ["epoch_2.pt"]


class _ThreadRecordingCatalog:
    """A catalog whose first scan (in the executor) waits for ``gate``; it records which
    threads asked for a listing while no scan had finished yet."""

    def __init__(self, inner):
        self.inner, self.gate = inner, threading.Event()
        self.scanned = False
        self.early_callers: set[str] = set()

    def entries(self):
        if not self.scanned:
            self.early_callers.add(threading.current_thread().name)
            if threading.current_thread().name == "convscope-executor":
                self.gate.wait(10)
        listing = self.inner.entries()
        self.scanned = True
        return listing

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_http_threads_wait_for_the_executor_scan_and_never_scan_themselves(
        make_app, checkpoint_dir, monkeypatch):
    """A first scan loads every checkpoint; a request that arrives before the executor's scan
    is done gets 503 E_NOT_READY rather than scanning (running models) in the HTTP thread."""
    import torch

    import app.services
    from app.catalog import ModelCatalog

    monkeypatch.setattr(app.services, "CATALOG_WAIT_S", 0.05)
    catalog = _ThreadRecordingCatalog(ModelCatalog(checkpoint_dir, torch.device("cpu"),
                                                   settle_seconds=0,
                                                   rescan_seconds=float("inf")))
    client = make_app(catalog=catalog, wait=False).test_client()
    for path in ("/api/v1/models", "/", "/models", "/api/v1/visualizations?model=latest"):
        response = client.get(path, headers={"Accept": "application/json"})
        assert response.status_code == 503, path
        assert response.json["error"]["code"] == "E_NOT_READY"
        assert response.headers["Retry-After"]
    response = client.post("/api/v1/jobs", json={"images": ["0" * 64],
                                                  "visualizations": [{"name": "saliency"}]})
    assert response.status_code == 503
    assert catalog.early_callers == {"convscope-executor"}
    catalog.gate.set()
    from tests.web.conftest import wait_ready
    wait_ready(client)
    assert client.get("/api/v1/models").status_code == 200
