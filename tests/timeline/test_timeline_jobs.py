"""Timelines on the server: a job over several checkpoints with the API's shapes, predictions and
accuracies that agree with the CLI (one pipeline), the broken checkpoint reported, the catalog's
model cache left alone, a repeat answered entirely from the store, shared-scale frames and the
signed difference map, flips between any two checkpoints, cancel, and the pages."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from app.rendering import colorize
from tests.datasets.models import COLOURS, colour_image
from tests.web.conftest import csrf_from, upload, wait_ready

TERMINAL = {"done", "failed", "cancelled"}
BROKEN = "epoch=2-step=20.pt"


@pytest.fixture
def make_app(tmp_path: Path, run_dir: Path, dataset_root: Path):
    from app import create_app
    from app.catalog import ModelCatalog

    built = []

    def build(**settings):
        directory = settings.pop("checkpoint_dir", run_dir)
        config = {"data_dir": tmp_path / "data", "checkpoint_dir": directory,
                  "dataset_dir": dataset_root, "device": "cpu", "testing": True, **settings}
        config["catalog"] = ModelCatalog(directory, torch.device("cpu"), settle_seconds=0,
                                         rescan_seconds=float("inf"))
        app = create_app(config)
        built.append(app)
        wait_ready(app.test_client())
        return app

    yield build
    for app in built:
        app.extensions["convscope"].shutdown(timeout=10)


def _png(colour: str, mix: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(colour_image(rng, COLOURS[colour], mix=COLOURS[mix], amount=0.35)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def wait_timeline(client, timeline_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/api/v1/timelines/{timeline_id}")
        assert response.status_code == 200, response.json
        if response.json["status"] in TERMINAL:
            return response.json
        assert time.monotonic() < deadline, f"still {response.json['status']}"
        time.sleep(0.05)


def _dataset_id(client) -> str:
    return next(d["id"] for d in client.get("/api/v1/datasets").json["datasets"]
                if d["name"] == "colours")


def _submit(client, images: list[str], **fields) -> dict:
    response = client.post("/api/v1/timelines", json={
        "images": images, "visualizations": [{"name": "grad_cam"}], **fields})
    assert response.status_code == 202, response.json
    assert set(response.json) == {"id", "url", "api_url"}
    return wait_timeline(client, response.json["id"])


def test_a_timeline_job_agrees_with_the_cli_and_a_repeat_reuses_everything(
        make_app, run_dir: Path, dataset_root: Path, saved: list, tmp_path: Path) -> None:
    app = make_app()
    client = app.test_client()
    catalog = app.extensions["convscope"].catalog
    cached_before = set(catalog._models)
    pictures = [(_png("red", "yellow", 1), "orange.png"), (_png("green", "blue", 2), "teal.png")]
    ids = [image["id"] for image in upload(client, *pictures)]

    first = _submit(client, ids, dataset=_dataset_id(client))

    assert first["status"] == "done", first["error"]
    assert first["kind"] == "timeline" and first["model_runs"] > 0
    document = first["timeline"]
    files = [c["file"] for c in document["checkpoints"]]
    assert files == [c.file for c in saved[:3]] + [BROKEN] + [c.file for c in saved[3:]]
    broken = document["checkpoints"][3]
    assert broken["ok"] is False and broken["error"]["code"] == "E_CHECKPOINT_UNREADABLE"
    assert all(c["ok"] for n, c in enumerate(document["checkpoints"]) if n != 3)
    # A timeline never fills the catalog's model cache with its checkpoints.
    assert set(catalog._models) <= cached_before

    # The CLI on the same files says the same (one pipeline, one evaluation engine).
    for path, (data, _) in zip((tmp_path / "orange.png", tmp_path / "teal.png"), pictures,
                               strict=True):
        path.write_bytes(data)
    assert main(["timeline", str(run_dir), str(tmp_path / "orange.png"),
                 str(tmp_path / "teal.png"), "--method", "grad_cam", "--dataset",
                 str(dataset_root / "colours"), "--out", str(tmp_path / "cli"),
                 "--device", "cpu"]) == 0
    cli = json.loads((tmp_path / "cli" / "timeline.json").read_text())
    for server_cp, cli_cp in zip(document["checkpoints"], cli["checkpoints"], strict=True):
        for field in ("file", "sha256", "epoch", "step", "order_by", "ok", "recall"):
            assert server_cp[field] == cli_cp[field], (field, server_cp, cli_cp)
        assert server_cp["accuracy"] == pytest.approx(cli_cp["accuracy"]) if cli_cp[
            "accuracy"] is not None else server_cp["accuracy"] is None
    assert document["flips"] == cli["flips"]
    for server_image, cli_image in zip(document["images"], cli["images"], strict=True):
        assert server_image["targets"] == cli_image["targets"]
        for server_step, cli_step in zip(server_image["steps"], cli_image["steps"], strict=True):
            assert server_step["checkpoint"] == cli_step["checkpoint"]
            assert [p["index"] for p in server_step["predictions"]] == \
                [p["index"] for p in cli_step["predictions"]]
            server_panel = server_step["visualizations"][0]["panels"][0]
            cli_panel = cli_step["visualizations"][0]["panels"][0]
            stored = client.get(f"/api/v1/results/{server_panel['result_key']}/"
                                f"{server_panel['array']}")
            assert stored.status_code == 200
            np.testing.assert_array_equal(np.load(io.BytesIO(stored.data)),
                                          np.load(tmp_path / "cli" / cli_panel["array"]))

    # The same timeline again: every checkpoint x image x method x target, every prediction
    # and every dataset chunk comes from the store; no model is loaded.
    loads = []
    real_load = catalog.load
    catalog.load = lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs)
    second = _submit(client, ids, dataset=_dataset_id(client))
    catalog.load = real_load
    assert second["status"] == "done"
    assert second["model_runs"] == 0 and second["cache_hits"] >= 5 * 2 * 2
    assert loads == []
    assert second["timeline"]["images"] == document["images"]
    assert second["timeline"]["checkpoints"] == document["checkpoints"]


def test_frames_share_a_scale_and_the_difference_is_signed(make_app, saved) -> None:
    client = make_app().test_client()
    ids = [image["id"] for image in upload(client, (_png("red", "yellow", 1), "orange.png"))]
    view = _submit(client, ids)
    document = view["timeline"]
    steps = document["images"][0]["steps"]
    assert len(steps) == len(saved)
    base = f"/api/v1/timelines/{view['id']}"
    arrays = []
    for step in steps:
        panel = step["visualizations"][0]["panels"][0]
        arrays.append(np.load(io.BytesIO(client.get(
            f"/api/v1/results/{panel['result_key']}/{panel['array']}").data)))
    frames = [client.get(f"{base}/frames/0/0/0/{number}.png") for number in range(len(steps))]
    assert all(frame.status_code == 200 and frame.mimetype == "image/png" for frame in frames)
    # Shared scale: the frame whose map is weakest overall is darker on the strip than it is on
    # its own scale (the stored per-result overlay).
    weakest = int(np.argmin([a.max() for a in arrays]))
    strongest = int(np.argmax([a.max() for a in arrays]))
    assert weakest != strongest
    own = Image.open(io.BytesIO(client.get(
        f"/api/v1/results/{steps[weakest]['visualizations'][0]['panels'][0]['result_key']}/"
        f"{steps[weakest]['visualizations'][0]['panels'][0]['overlay']}").data))
    shared = Image.open(io.BytesIO(frames[weakest].data))
    assert np.asarray(shared, float).mean() < np.asarray(own, float).mean() - 1.0

    # B - A, on a symmetric scale, computed here from the stored arrays.
    a, b = 0, len(steps) - 1
    difference = client.get(f"{base}/difference/0/0/0.png?a={a}&b={b}")
    assert difference.status_code == 200
    expected = colorize(arrays[b] - arrays[a], True)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(difference.data))), expected)
    same = np.asarray(Image.open(io.BytesIO(client.get(
        f"{base}/difference/0/0/0.png?a=1&b=1").data)))
    assert (same == colorize(np.zeros((2, 2)), True)[0, 0]).all()   # no change: all neutral
    assert client.get(f"{base}/difference/0/0/0.png?a=0&b=99").status_code == 400
    assert client.get(f"{base}/frames/0/0/9/0.png").status_code == 404


def test_flips_between_any_two_checkpoints(make_app, saved) -> None:
    client = make_app().test_client()
    ids = [image["id"] for image in upload(client, (_png("red", "yellow", 1), "orange.png"))]
    view = _submit(client, ids, dataset=_dataset_id(client))
    flips = view["timeline"]["flips"]
    assert [(f["from"], f["to"]) for f in flips] == [(a.file, b.file)
                                                    for a, b in zip(saved, saved[1:])]
    base = f"/api/v1/timelines/{view['id']}/flips"
    neighbours = client.get(f"{base}?a=0&b=1").json
    assert neighbours["right_to_wrong"] == flips[0]["right_to_wrong"]
    assert neighbours["wrong_to_right"] == flips[0]["wrong_to_right"]
    # First to last: an image that flipped and flipped back is in neither list.
    across = client.get(f"{base}?a=0&b={len(saved) - 1}").json
    went_right = set().union(*(f["wrong_to_right"] for f in flips))
    went_wrong = set().union(*(f["right_to_wrong"] for f in flips))
    assert set(across["wrong_to_right"]) <= went_right
    assert set(across["right_to_wrong"]) <= went_wrong
    page = client.get(f"/timelines/{view['id']}?a=0&b=4")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Dataset accuracy over training" in html and "Per-class recall" in html
    assert html.count('<figure class="filmstrip">') == 1
    assert "/difference/0/0/0.png?a=0&amp;b=4" in html or "a=0&amp;b=4" in html

    # A flipped image, clicked: a timeline of that dataset image on the flip's two checkpoints.
    page = client.get(f"/timelines/{view['id']}?a=0&b=1")
    flipped = (neighbours["right_to_wrong"] + neighbours["wrong_to_right"])[0]
    assert f'value="{flipped}"' in page.get_data(as_text=True)
    form = {"csrf_token": csrf_from(page.data), "a": "0", "b": "1"}
    assert client.post(f"/timelines/{view['id']}/explain",
                       data={**form, "path": "red/none.png"}).status_code == 404
    response = client.post(f"/timelines/{view['id']}/explain", data={**form, "path": flipped})
    assert response.status_code == 303
    job_id = response.headers["Location"].split("?")[0].rsplit("/", 1)[-1]
    explained = wait_timeline(client, job_id)
    assert [c["file"] for c in explained["timeline"]["checkpoints"]] == [saved[0].file,
                                                                       saved[1].file]
    assert explained["timeline"]["images"][0]["file"] == flipped.replace("/", " \u203a ")
    tops = [step["predictions"][0]["index"] for step in explained["timeline"]["images"][0]["steps"]]
    assert tops[0] != tops[1]           # it flipped, so the two checkpoints disagree
    assert "img class=\"difference\"" in client.get(response.headers["Location"]).get_data(
        as_text=True)


def test_bad_requests_and_other_kinds(make_app) -> None:
    client = make_app().test_client()
    ids = [image["id"] for image in upload(client, (_png("red", "yellow", 1), "orange.png"))]
    bad = client.post("/api/v1/timelines", json={"images": ids, "visualizations": [
        {"name": "grad_cam"}], "colour": 1})
    assert bad.status_code == 400 and bad.json["error"]["code"] == "E_BAD_REQUEST"
    bad = client.post("/api/v1/timelines", json={"images": ids, "visualizations": [
        {"name": "grad_cam"}], "every": 0})
    assert bad.status_code == 400
    bad = client.post("/api/v1/timelines", json={"images": ids, "visualizations": [
        {"name": "grad_cam"}], "targets": ["mauve"]})
    assert bad.json["error"]["code"] == "E_UNKNOWN_CLASS"
    assert client.get("/api/v1/timelines/" + "0" * 32).status_code == 404
    job = client.post("/api/v1/jobs", json={"model": "latest", "images": ids,
                                            "visualizations": [{"name": "grad_cam"}]}).json
    assert client.get(f"/api/v1/timelines/{job['id']}").status_code == 404


def test_every_kth(make_app, saved) -> None:
    client = make_app().test_client()
    ids = [image["id"] for image in upload(client, (_png("red", "yellow", 1), "orange.png"))]
    view = _submit(client, ids, every=3)
    assert [c["file"] for c in view["timeline"]["checkpoints"]] == [
        saved[0].file, BROKEN, saved[-1].file]
    assert client.get("/api/v1/jobs/" + view["id"]).status_code == 303   # its own view


def test_cancel_stops_a_running_timeline(make_app, run_dir: Path) -> None:
    """On a model that takes 0.2 s per forward pass, a timeline of Integrated Gradients takes
    minutes; cancelled once it runs, it ends cancelled within seconds."""
    config = (run_dir / "convscope.toml").read_text()
    (run_dir / "convscope.toml").write_text(config.replace("models:ColourNet",
                                                           "models:SlowColourNet"))
    client = make_app(checkpoint_dir=run_dir).test_client()
    ids = [image["id"] for image in upload(client, (_png("red", "yellow", 1), "orange.png"),
                                           (_png("green", "blue", 2), "teal.png"))]
    response = client.post("/api/v1/timelines", json={
        "images": ids, "visualizations": [{"name": "integrated_gradients",
                                           "params": {"steps": 1024}}]})
    assert response.status_code == 202
    url = f"/api/v1/timelines/{response.json['id']}"
    deadline = time.monotonic() + 60
    while client.get(url).json["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    assert client.delete(url).status_code == 200
    final = wait_timeline(client, response.json["id"], timeout=30)
    assert final["status"] == "cancelled" and final["error"]["code"] == "E_CANCELLED"
    assert time.monotonic() - started < 15 and final["progress"] < 1.0


def test_the_timeline_form_runs_a_timeline(make_app) -> None:
    client = make_app().test_client()
    page = client.get("/timelines")
    assert page.status_code == 200 and b"epoch=2-step=20.pt" in page.data
    data = {"csrf_token": csrf_from(page.data), "method": "grad_cam", "target": "predicted",
            "every": "1",
            "image": [(io.BytesIO(_png("green", "blue", 2)), "teal.png")]}
    response = client.post("/timelines", data=data, content_type="multipart/form-data")
    assert response.status_code == 303, response.get_data(as_text=True)[:500]
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    assert wait_timeline(client, job_id)["status"] == "done"
    html = client.get(f"/timelines/{job_id}").get_data(as_text=True)
    # Five frames in the strip, and checkpoints A and B in the compare view.
    assert html.count("/frames/0/0/0/") == 5 + 2 and "Compare two checkpoints" in html


def test_extend_answers_the_page_script_in_json_and_a_form_with_a_redirect(make_app) -> None:
    """Follow training posts the Extend form asking for JSON and stays on the page: 202 with the
    extended timeline's addresses. A plain form post (no script) still goes to the new page."""
    client = make_app().test_client()
    ids = [image["id"] for image in upload(client, (_png("red", "yellow", 1), "orange.png"))]
    view = _submit(client, ids)
    page = client.get(f"/timelines/{view['id']}")
    html = page.get_data(as_text=True)
    assert 'id="follow-training"' in html and 'id="follow-training" checked' not in html
    assert 'id="follow-training" checked' in client.get(
        f"/timelines/{view['id']}?follow=1").get_data(as_text=True)
    token = csrf_from(page.data)
    as_json = {"Accept": "application/json"}

    response = client.post(f"/timelines/{view['id']}/extend", data={"csrf_token": token},
                           headers=as_json)
    assert response.status_code == 202, response.get_data(as_text=True)[:300]
    assert set(response.json) == {"id", "url", "api_url"}
    new_id = response.json["id"]
    assert new_id != view["id"]
    assert response.json["url"] == f"/timelines/{new_id}"
    assert response.json["api_url"] == f"/api/v1/timelines/{new_id}"
    assert response.headers["Location"].endswith(response.json["api_url"])
    extended = wait_timeline(client, new_id)
    # The same checkpoints again: everything comes from the store.
    assert extended["status"] == "done" and extended["model_runs"] == 0
    assert extended["timeline"]["images"] == view["timeline"]["images"]

    response = client.post(f"/timelines/{view['id']}/extend", data={"csrf_token": token})
    assert response.status_code == 303
    redirected_id = response.headers["Location"].rsplit("/", 1)[-1]
    assert response.headers["Location"].endswith(f"/timelines/{redirected_id}")
    assert redirected_id not in (view["id"], new_id)
    assert wait_timeline(client, redirected_id)["status"] == "done"

    # Errors in the usual shape, JSON for a client asking for JSON.
    missing = client.post("/timelines/" + "0" * 32 + "/extend", data={"csrf_token": token},
                          headers=as_json)
    assert missing.status_code == 404 and missing.json["error"]["code"] == "E_NOT_FOUND"
    job = client.post("/api/v1/jobs", json={"model": "latest", "images": ids,
                                            "visualizations": [{"name": "grad_cam"}]}).json
    not_a_timeline = client.post(f"/timelines/{job['id']}/extend",
                                 data={"csrf_token": token}, headers=as_json)
    assert not_a_timeline.status_code == 404
    assert not_a_timeline.json["error"]["code"] == "E_NOT_FOUND"
    forged = client.post(f"/timelines/{view['id']}/extend", data={"csrf_token": "forged"},
                         headers=as_json)
    assert forged.status_code == 403 and forged.json["error"]["code"] == "E_FORBIDDEN"
