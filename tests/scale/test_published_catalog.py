"""The web side of broker mode without a cluster: the checkpoint listing workers publish, and a
web process whose Redis cannot be reached (503 E_BROKER_UNAVAILABLE, health up, readiness down,
nothing half-recorded)."""
from __future__ import annotations

import socket

import pytest
import torch

from app import create_app
from app.catalog import ModelCatalog
from app.errors import ConfigInvalid, Internal
from app.published_catalog import PublishedCatalog, publish_catalog
from app.settings import load_settings
from tests.web.conftest import png_bytes, upload, write_checkpoint_dir


@pytest.fixture
def scanned(tmp_path):
    directory = write_checkpoint_dir(tmp_path / "checkpoints", broken_file=True)
    (directory / "epoch_03.pt").write_bytes((directory / "tiny.pt").read_bytes())
    catalog = ModelCatalog(directory, torch.device("cpu"), settle_seconds=0,
                           rescan_seconds=float("inf"))
    return catalog, tmp_path / "data"


def test_the_published_listing_reads_back_as_the_workers_catalog(scanned):
    catalog, data_dir = scanned
    data_dir.mkdir()
    assert publish_catalog(catalog.entries(), data_dir)
    assert not publish_catalog(catalog.entries(), data_dir)       # unchanged: not rewritten
    published = PublishedCatalog(data_dir)
    assert published.wait(0)
    original = catalog.entries()
    read = published.entries()
    assert [entry.to_dict() for entry in read] == [entry.to_dict() for entry in original]
    for mine, theirs in zip(read, original):
        assert mine.meta == theirs.meta                 # class names, CAM layers, normalization
        assert mine.progress == theirs.progress
        assert (mine.error is None) == (theirs.error is None)
        if mine.error is not None:
            assert type(mine.error) is type(theirs.error)
            assert mine.error.message == theirs.error.message
    assert [e.file for e in published.in_training_order()] == \
        [e.file for e in catalog.in_training_order()]
    assert published.get("latest").id == catalog.get("latest").id
    with pytest.raises(Internal):
        published.load(published.get("latest").id)


def test_a_listing_not_yet_published_is_waited_for(tmp_path):
    assert not PublishedCatalog(tmp_path).wait(0.1)


def test_a_broker_url_must_be_redis(tmp_path):
    with pytest.raises(ConfigInvalid) as refused:
        load_settings({"broker_url": "amqp://guest@localhost//", "data_dir": tmp_path})
    assert "CONVSCOPE_BROKER_URL" in refused.value.fields
    assert load_settings({"broker_url": "redis://localhost:6379/0",
                          "data_dir": tmp_path}).broker_url


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]       # closed again when the socket is


def test_without_redis_a_web_process_answers_503_and_records_nothing(scanned):
    catalog, data_dir = scanned
    data_dir.mkdir()
    publish_catalog(catalog.entries(), data_dir)
    app = create_app({"data_dir": data_dir, "testing": True, "device": "cpu",
                      "broker_url": f"redis://127.0.0.1:{closed_port()}/0"})
    client = app.test_client()
    assert client.get("/api/v1/health").status_code == 200
    ready = client.get("/api/v1/ready")
    assert ready.status_code == 503
    assert client.get("/api/v1/models").json["models"]          # the published listing
    image = upload(client, (png_bytes(seed=1), "photo.png"))[0]["id"]
    refused = client.post("/api/v1/jobs", json={"model": "latest", "images": [image],
                                                 "visualizations": [{"name": "grad_cam"}]})
    assert refused.status_code == 503, refused.json
    assert refused.json["error"]["code"] == "E_BROKER_UNAVAILABLE"
    assert int(refused.headers["Retry-After"]) > 0
    assert list((data_dir / "jobs").glob("*.json")) == []
    assert client.get("/api/v1/workers").json["workers"] == []
