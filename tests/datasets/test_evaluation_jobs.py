"""Evaluations on the server: the API's shapes and errors, the same numbers as the CLI, the
cache (a repeat is instant, a changed file is re-read), cancel, restart survival, thumbnails by
number, and Explain turning chosen images into a visualization job with their true labels."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from PIL import Image

import app.evaluation as evaluation_module
from app.cli import main
from tests.datasets.models import COLOURS, write_checkpoint_dir
from tests.web.conftest import wait_job

TERMINAL = {"done", "failed", "cancelled"}


def wait_evaluation(client, evaluation_id: str, timeout: float = 120.0,
                    until=lambda view: view["status"] in TERMINAL) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/api/v1/evaluations/{evaluation_id}")
        assert response.status_code == 200, response.json
        if until(response.json):
            return response.json
        assert time.monotonic() < deadline, f"still {response.json['status']}"
        time.sleep(0.05)


def dataset_id(client, name: str = "colours") -> str:
    listed = client.get("/api/v1/datasets").json["datasets"]
    return next(entry["id"] for entry in listed if entry["name"] == name)


def evaluate(client, name: str = "colours") -> dict:
    response = client.post("/api/v1/evaluations", json={"dataset": dataset_id(client, name)})
    assert response.status_code == 202, response.json
    assert set(response.json) == {"id", "url", "api_url"}
    return wait_evaluation(client, response.json["id"])


def test_datasets_are_listed_by_id(client, dataset_root: Path) -> None:
    (dataset_root / "unlabelled").mkdir()
    Image.new("RGB", (16, 16)).save(dataset_root / "unlabelled" / "loose.png")
    listed = client.get("/api/v1/datasets").json["datasets"]
    by_name = {entry["name"]: entry for entry in listed}
    colours = by_name["colours"]
    assert {"id", "name", "images", "classes"} <= set(colours)
    assert (colours["images"], colours["classes"]) == (60, ["blue", "green", "red", "yellow"])
    assert len(colours["id"]) == 16 and colours["id"] not in str(dataset_root)
    assert by_name["unlabelled"]["error"]["code"] == "E_DATASET_LABELS"
    page = client.get("/datasets")
    assert page.status_code == 200 and b"colours" in page.data and b"E_DATASET_LABELS" in page.data


def test_an_evaluation_reports_what_the_cli_reports(client, checkpoint_dir: Path,
                                                     colours: Path, tmp_path: Path) -> None:
    view = evaluate(client)
    assert view["status"] == "done" and view["progress"] == 1.0
    assert (view["model_runs"], view["cache_hits"]) == (60, 0)
    assert main(["evaluate", str(checkpoint_dir), str(colours), "--out",
                 str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "evaluation.json").read_text(encoding="utf-8"))
    for key in ("accuracy", "top5_accuracy", "classes", "confusion", "failures", "calibration",
                "skipped", "least_certain_correct", "top_confusions"):
        assert view[key] == cli[key], key
    assert [{k: v for k, v in image.items()} for image in view["images"]] == cli["images"]
    assert view["model"]["sha256"] == cli["model"]["sha256"]
    # No server path in the API: the dataset is named, not located.
    assert str(colours) not in json.dumps(view)
    assert view["dataset"]["path"] == "colours"


def test_submissions_are_checked_before_any_model_pass(make_app, dataset_root: Path,
                                                       monkeypatch) -> None:
    app = make_app()
    client = app.test_client()
    (dataset_root / "odd").mkdir()
    for folder in ("red", "crimson"):
        (dataset_root / "odd" / folder).mkdir()
        Image.new("RGB", (16, 16)).save(dataset_root / "odd" / folder / "a.png")
    (dataset_root / "empty").mkdir()
    loads = []
    catalog = app.extensions["convscope"].catalog
    original = catalog.load
    monkeypatch.setattr(catalog, "load", lambda *a, **k: loads.append(a) or original(*a, **k))

    def post(body, **options):
        return client.post("/api/v1/evaluations", json=body, **options)

    cases = [({"dataset": "0" * 16}, 404, "E_DATASET_NOT_FOUND"),
             ({"dataset": "../colours"}, 404, "E_DATASET_NOT_FOUND"),
             ({"dataset": dataset_id(client, "odd")}, 422, "E_DATASET_LABELS"),
             ({"dataset": dataset_id(client, "empty")}, 422, "E_DATASET_EMPTY"),
             ({"dataset": dataset_id(client), "top_k": 0}, 400, "E_BAD_REQUEST"),
             ({"dataset": dataset_id(client), "colour": 1}, 400, "E_BAD_REQUEST"),
             ({"dataset": dataset_id(client), "model": "nope"}, 404, "E_UNKNOWN_MODEL"),
             ({}, 400, "E_BAD_REQUEST")]
    for body, status, code in cases:
        response = post(body)
        assert (response.status_code, response.json["error"]["code"]) == (status, code), body
    assert "'crimson'" in post({"dataset": dataset_id(client, "odd")}).json["error"]["message"]
    response = client.post("/api/v1/evaluations", data="dataset=x")
    assert response.status_code == 415
    assert loads == [] and app.extensions["convscope"].executor.queued() == 0


def test_a_repeat_is_instant_and_a_changed_file_is_read_again(make_app, colours: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(evaluation_module, "CHUNK_EVERY", 6)     # ~10 chunks of 60 files
    app = make_app()
    client = app.test_client()
    first = evaluate(client)
    assert (first["model_runs"], first["cache_hits"]) == (60, 0)

    loads = []
    catalog = app.extensions["convscope"].catalog
    original = catalog.load
    monkeypatch.setattr(catalog, "load", lambda *a, **k: loads.append(a) or original(*a, **k))
    started = time.perf_counter()
    repeat = evaluate(client)
    assert (repeat["model_runs"], repeat["cache_hits"]) == (0, 60)
    assert loads == []                          # the model was not even loaded
    assert repeat["images"] == first["images"] and repeat["failures"] == first["failures"]
    assert time.perf_counter() - started < 10

    # A red image becomes a blue one (new bytes, new mtime): only its chunk is read again.
    changed = colours / "red" / "clean-3.png"
    Image.new("RGB", (32, 32), COLOURS["blue"]).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    third = evaluate(client)
    assert 1 <= third["model_runs"] < 30 and third["model_runs"] + third["cache_hits"] == 60
    before = {image["file"]: image for image in first["images"]}
    after = {image["file"]: image for image in third["images"]}
    assert before["red/clean-3.png"]["predicted"]["label"] == "red"
    assert after["red/clean-3.png"]["predicted"]["label"] == "blue"
    assert "red/clean-3.png" in third["failures"]
    assert {file: after[file] for file in after if file != "red/clean-3.png"} == \
        {file: before[file] for file in before if file != "red/clean-3.png"}

    # An added file: its chunk only; the new image is in the outcome.
    Image.new("RGB", (32, 32), COLOURS["green"]).save(colours / "green" / "added.png")
    fourth = evaluate(client)
    assert 1 <= fourth["model_runs"] < 30
    assert "green/added.png" in {image["file"] for image in fourth["images"]}


def test_cancel_stops_a_running_evaluation(make_app, tmp_path: Path, trained_net,
                                           colours: Path) -> None:
    slow = write_checkpoint_dir(tmp_path / "slow", trained_net, factory="SlowColourNet")
    for number in range(60):                    # 120 images: many slow batches
        Image.new("RGB", (32, 32), COLOURS["red"]).save(colours / "red" / f"more-{number}.png")
    client = make_app(checkpoint_dir=slow).test_client()
    response = client.post("/api/v1/evaluations", json={"dataset": dataset_id(client)})
    evaluation_id = response.json["id"]
    running = wait_evaluation(client, evaluation_id,
                              until=lambda view: view["status"] == "running"
                              and view["progress"] > 0)
    assert running["progress"] < 1
    cancelled = client.delete(f"/api/v1/evaluations/{evaluation_id}")
    assert cancelled.status_code == 200
    final = wait_evaluation(client, evaluation_id, timeout=20)
    assert final["status"] == "cancelled" and final["error"]["code"] == "E_CANCELLED"
    assert "accuracy" not in final
    deadline = time.monotonic() + 10
    while any(thread.name.startswith("convscope-decode") for thread in threading.enumerate()):
        assert time.monotonic() < deadline, "decoding threads outlived the cancelled evaluation"
        time.sleep(0.1)


def test_evaluations_survive_a_restart(make_app) -> None:
    first = make_app()
    client = first.test_client()
    view = evaluate(client)
    first.extensions["convscope"].shutdown(timeout=10)
    again = make_app().test_client()            # a new process on the same data directory
    restored = again.get(f"/api/v1/evaluations/{view['id']}").json
    assert restored["status"] == "done" and restored["accuracy"] == view["accuracy"]
    assert restored["images"] == view["images"]
    assert again.get(f"/evaluations/{view['id']}").status_code == 200


def test_thumbnails_are_served_by_number(client) -> None:
    view = evaluate(client)
    base = f"/api/v1/evaluations/{view['id']}/thumbnails"
    response = client.get(f"{base}/0")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert view["thumbnail_url"].replace("{number}", "0") == f"{base}/0"
    assert client.get(f"{base}/60").status_code == 404
    assert client.get(f"{base}/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get(f"/api/v1/evaluations/{'f' * 32}/thumbnails/0").status_code == 404


def test_explain_makes_a_job_with_the_true_labels(client) -> None:
    view = evaluate(client)
    failure = next(image for image in view["images"] if not image["correct"])
    right = next(image for image in view["images"] if image["correct"])
    response = client.post(f"/api/v1/evaluations/{view['id']}/explain",
                           json={"images": [failure["number"], right["number"]]})
    assert response.status_code == 202, response.json
    job = wait_job(client, response.json["id"])
    assert job["status"] == "done"
    results = {result["filename"]: result for result in job["results"]}
    explained = results[failure["file"].replace("/", " \u203a ")]
    assert explained["failure"] is True
    assert explained["true_label"]["index"] == failure["true"]["index"]
    assert explained["predictions"][0]["index"] == failure["predicted"]["index"]
    targets = {panel["target"]["index"] for panel in explained["visualizations"][0]["panels"]}
    assert targets == {failure["true"]["index"], failure["predicted"]["index"]}
    assert results[right["file"].replace("/", " \u203a ")]["failure"] is False
    bad = client.post(f"/api/v1/evaluations/{view['id']}/explain", json={"images": [999]})
    assert bad.status_code == 400 and bad.json["error"]["code"] == "E_BAD_REQUEST"


def test_an_evaluation_is_not_a_visualization_job(client) -> None:
    view = evaluate(client)
    assert client.get(f"/api/v1/jobs/{view['id']}").status_code == 303
    assert client.get(f"/jobs/{view['id']}").headers["Location"].endswith(view["url"])
    job = client.post("/api/v1/jobs", json={"images": [], "visualizations": []})
    assert job.status_code == 400

