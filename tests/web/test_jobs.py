"""Jobs through the API: validation at submit, results, cache, queue, cancel, failures, restart."""
from __future__ import annotations

import dataclasses
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.web.conftest import (png_bytes, run_job, submit, upload, wait_job,
                                write_checkpoint_dir)

PANEL_KEYS = {"title", "target", "signed", "overlay_url", "heatmap_url", "array_url",
              "value_range"}


@pytest.fixture
def image_id(client):
    return upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]


def test_job_runs_and_results_have_the_documented_shape(client, image_id):
    response = submit(client, [image_id], [{"name": "grad_cam"}, {"name": "saliency"}])
    assert response.status_code == 202
    assert set(response.json) >= {"id", "url"}
    assert response.json["url"] == f"/jobs/{response.json['id']}"
    job = wait_job(client, response.json["id"])
    assert job["status"] == "done" and job["progress"] == 1.0 and job["error"] is None
    assert set(job) >= {"id", "status", "progress", "error", "results"}
    [result] = job["results"]
    assert set(result) >= {"image", "true_label", "failure", "predictions", "visualizations"}
    assert result["image"] == image_id and result["failure"] is False
    assert len(result["predictions"]) == 4          # top-k, capped at the class count
    assert {p["label"] for p in result["predictions"]} == {"cat", "dog", "bird", "fish"}
    assert [v["name"] for v in result["visualizations"]] == ["grad_cam", "saliency"]
    for visualization in result["visualizations"]:
        assert set(visualization) >= {"name", "params", "elapsed_ms", "panels"}
        assert visualization["elapsed_ms"] > 0
        [panel] = visualization["panels"]
        assert set(panel) >= PANEL_KEYS
        assert panel["target"]["index"] == result["predictions"][0]["index"]
        low, high = panel["value_range"]
        assert low <= high
        for key in ("overlay_url", "heatmap_url"):
            png = client.get(panel[key])
            assert png.status_code == 200 and png.mimetype == "image/png"
            assert Image.open(io.BytesIO(png.data)).size == (32, 32)
        array = client.get(panel["array_url"])
        assert array.status_code == 200
        assert "attachment" in array.headers["Content-Disposition"]
        values = np.load(io.BytesIO(array.data), allow_pickle=False)
        assert values.shape == (32, 32) and np.isfinite(values).all()
        record = json.loads(client.get(panel["json_url"]).data)
        assert record["method"] == visualization["name"]
    assert job["model_runs"] == 3 and job["cache_hits"] == 0   # prediction + 2 methods


def test_same_request_again_is_answered_from_the_store(client, image_id):
    methods = [{"name": "occlusion", "params": {"window": 8, "stride": 8}}]
    first = run_job(client, [image_id], methods)
    assert first["status"] == "done" and first["model_runs"] == 2 and first["cache_hits"] == 0
    # The AUTO stride of window 8 is 4; explicit and resolved values share cache entries.
    second = run_job(client, [image_id], methods)
    assert second["status"] == "done"
    assert second["model_runs"] == 0 and second["cache_hits"] == 2
    assert second["results"][0]["visualizations"][0]["cached"] == 1
    assert (second["results"][0]["visualizations"][0]["panels"]
            == first["results"][0]["visualizations"][0]["panels"])
    other = run_job(client, [image_id], [{"name": "occlusion", "params": {"window": 16}}])
    assert other["model_runs"] == 1 and other["cache_hits"] == 1   # prediction cached only


def test_failure_case_has_predicted_and_true_class_panels(client, image_id):
    first = run_job(client, [image_id])
    predicted = first["results"][0]["predictions"][0]
    wrong = next(label for label in ("cat", "dog", "bird") if label != predicted["label"])
    job = run_job(client, [image_id], true_labels={image_id: wrong})
    [result] = job["results"]
    assert result["failure"] is True
    assert result["true_label"]["label"] == wrong
    targets = [panel["target"]["label"] for panel in result["visualizations"][0]["panels"]]
    assert targets == [predicted["label"], wrong]
    right = run_job(client, [image_id], true_labels={image_id: predicted["index"]})
    assert right["results"][0]["failure"] is False


def test_explicit_target_by_label_and_index(client, image_id):
    job = run_job(client, [image_id], targets=["dog", 3])
    labels = [p["target"]["label"] for p in job["results"][0]["visualizations"][0]["panels"]]
    assert labels == ["dog", "fish"]


@pytest.mark.parametrize("change, status, code", [
    ({"model": "nope"}, 404, "E_UNKNOWN_MODEL"),
    ({"images": ["0" * 64]}, 404, "E_NOT_FOUND"),
    ({"images": []}, 400, "E_BAD_REQUEST"),
    ({"images": "abc"}, 400, "E_BAD_REQUEST"),
    ({"visualizations": [{"name": "nope"}]}, 400, "E_UNKNOWN_VISUALIZATION"),
    ({"visualizations": []}, 400, "E_BAD_REQUEST"),
    ({"visualizations": [{"name": "occlusion", "params": {"window": 0}}]}, 400,
     "E_BAD_PARAMETER"),
    ({"visualizations": [{"name": "occlusion", "params": {"window": "big"}}]}, 400,
     "E_BAD_PARAMETER"),
    ({"visualizations": [{"name": "grad_cam", "params": {"colour": 1}}]}, 400,
     "E_BAD_PARAMETER"),
    ({"visualizations": [{"name": "grad_cam", "params": {"layer": "nope"}}]}, 400,
     "E_BAD_PARAMETER"),
    ({"targets": ["unicorn"]}, 400, "E_UNKNOWN_CLASS"),
    ({"targets": [99]}, 400, "E_UNKNOWN_CLASS"),
    ({"targets": [True]}, 400, "E_BAD_PARAMETER"),
    ({"true_labels": {"0" * 64: "cat"}}, 400, "E_BAD_REQUEST"),
    ({"surprise": 1}, 400, "E_BAD_REQUEST"),
])
def test_bad_job_requests_are_refused_at_submit(client, image_id, change, status, code):
    body = {"model": "latest", "images": [image_id], "visualizations": [{"name": "grad_cam"}],
            **change}
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code
    assert client.application.extensions["convscope"].executor.queued() == 0


def test_true_label_must_be_a_known_class(client, image_id):
    response = submit(client, [image_id], true_labels={image_id: "unicorn"})
    assert response.status_code == 400 and response.json["error"]["code"] == "E_UNKNOWN_CLASS"


def test_job_body_must_be_json(client, image_id):
    response = client.post("/api/v1/jobs", data={"model": "latest"})
    assert response.status_code == 415
    assert response.json["error"]["code"] == "E_UNSUPPORTED_MEDIA_TYPE"
    response = client.post("/api/v1/jobs", data="{not json", content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "E_BAD_REQUEST"
    response = client.post("/api/v1/jobs", json=[1, 2])
    assert response.status_code == 400 and response.json["error"]["code"] == "E_BAD_REQUEST"


def test_too_expensive_request_is_refused_with_a_hint(make_app):
    client = make_app(max_cost=50).test_client()
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    response = submit(client, [image], [{"name": "occlusion", "params": {"window": 2,
                                                                         "stride": 1}}])
    assert response.status_code == 422
    error = response.json["error"]
    assert error["code"] == "E_TOO_EXPENSIVE"
    assert "50" in error["message"] and "stride" in error["message"]
    cheap = submit(client, [image], [{"name": "occlusion", "params": {"window": 16}}])
    assert cheap.status_code == 202


def test_unsupported_method_is_refused(make_app, tmp_path):
    directory = write_checkpoint_dir(tmp_path / "mlp", factory="FlatNet")
    client = make_app(directory=directory).test_client()
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    response = submit(client, [image], [{"name": "cam"}])
    assert response.status_code == 422
    assert response.json["error"]["code"] == "E_METHOD_UNSUPPORTED"


def test_full_queue_answers_503_busy_with_retry_after(make_app):
    app = make_app(queue_size=2, retry_after_s=7)
    client = app.test_client()
    executor = app.extensions["convscope"].executor
    gate, started = threading.Event(), threading.Event()
    original = executor._start

    def held(job):          # keep the executor busy with the first job until released
        started.set()
        gate.wait(10)
        return original(job)

    executor._start = held
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    accepted = [submit(client, [image]).json["id"]]
    assert started.wait(5)
    accepted += [submit(client, [image]).json["id"] for _ in range(2)]    # fills the queue
    response = submit(client, [image])
    assert response.status_code == 503
    assert response.json["error"]["code"] == "E_BUSY"
    assert response.headers["Retry-After"] == "7"
    gate.set()
    for job_id in accepted:
        assert wait_job(client, job_id)["status"] == "done"
    assert submit(client, [image]).status_code == 202       # room again


@pytest.mark.slow
def test_cancel_stops_a_long_occlusion_job_promptly(make_app, tmp_path):
    directory = write_checkpoint_dir(tmp_path / "slow", factory="SlowNet", size=48)
    app = make_app(directory=directory, batch_size=4, max_cost=100000)
    client = app.test_client()
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    # 48 x 48 windows of 1 px = 2304 evaluations at 4 per 30 ms forward: ~17 s if not stopped.
    response = submit(client, [image], [{"name": "occlusion", "params": {
        "window": 1, "stride": 1, "engine": "dense"}}])
    job_id = response.json["id"]
    running = wait_job(client, job_id, until=lambda job: job["progress"] > 0.02)
    assert running["status"] == "running"
    requested = time.monotonic()
    response = client.delete(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    job = wait_job(client, job_id, timeout=10)
    stopped_after = time.monotonic() - requested
    assert job["status"] == "cancelled" and job["error"]["code"] == "E_CANCELLED"
    assert job["results"][0]["visualizations"][0]["status"] == "cancelled"
    assert job["progress"] < 0.5
    assert stopped_after < 2.0, f"cancel took {stopped_after:.2f} s"
    # The executor keeps going, and cancelling a finished job changes nothing.
    after = run_job(client, [image], [{"name": "grad_cam"}])
    assert after["status"] == "done"
    assert client.delete(f"/api/v1/jobs/{job_id}").json["status"] == "cancelled"


def test_cancel_a_queued_job_and_the_cancel_button(held_executor):
    from tests.web.conftest import csrf_from

    app, client, executor, image, gate, started = held_executor
    first = submit(client, [image]).json["id"]
    assert started.wait(5)
    queued = submit(client, [image]).json["id"]
    assert client.get(f"/api/v1/jobs/{queued}").json["status"] == "queued"
    page = client.get(f"/jobs/{queued}")
    assert b"Cancel job" in page.data
    response = client.post(f"/jobs/{queued}/cancel", data={"csrf_token": csrf_from(page.data)})
    assert response.status_code == 303 and response.headers["Location"] == f"/jobs/{queued}"
    assert client.get(f"/api/v1/jobs/{queued}").json["status"] == "cancelled"
    gate.set()
    assert wait_job(client, first)["status"] == "done"
    assert wait_job(client, queued)["status"] == "cancelled"


def test_a_method_that_raises_fails_its_item_and_the_executor_keeps_going(client, image_id,
                                                                         monkeypatch):
    from visualizations import visualization_registry

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(visualization_registry.get("saliency"), "compute", explode)
    job = run_job(client, [image_id], [{"name": "saliency"}, {"name": "grad_cam"}])
    assert job["status"] == "failed"
    saliency, grad_cam = job["results"][0]["visualizations"]
    assert saliency["status"] == "failed" and saliency["error"]["code"] == "E_INTERNAL"
    assert grad_cam["status"] == "done" and grad_cam["panels"]
    assert "secret" not in json.dumps(job) and "/etc" not in json.dumps(job)
    monkeypatch.undo()
    assert run_job(client, [image_id], [{"name": "saliency"}])["status"] == "done"


def test_unknown_jobs_and_result_files_are_404(client, image_id):
    for path in ("/api/v1/jobs/" + "0" * 32, "/api/v1/jobs/..", "/api/v1/jobs/%2e%2e%2fx",
                 "/jobs/" + "0" * 32):
        response = client.get(path)
        assert response.status_code == 404, path
    job = run_job(client, [image_id])
    panel = job["results"][0]["visualizations"][0]["panels"][0]
    key = panel["overlay_url"].split("/")[4]
    for name in ("nope.png", "..", "..%2Fresult.json", ".tmp"):
        assert client.get(f"/api/v1/results/{key}/{name}").status_code == 404
    assert client.get(f"/api/v1/results/{'0' * 64}/result.json").status_code == 404
    assert client.delete("/api/v1/jobs/" + "1" * 32).status_code == 404


def test_restarted_server_serves_finished_jobs_and_results(make_app, image_id, client):
    job = run_job(client, [image_id], [{"name": "grad_cam"}])
    client.application.extensions["convscope"].shutdown()
    restarted = make_app().test_client()
    again = restarted.get(f"/api/v1/jobs/{job['id']}").json
    assert again["status"] == "done"
    assert again["results"] == job["results"]
    panel = again["results"][0]["visualizations"][0]["panels"][0]
    assert restarted.get(panel["overlay_url"]).status_code == 200
    assert restarted.get(f"/jobs/{job['id']}").status_code == 200
    assert restarted.get(f"/api/v1/images/{image_id}").status_code == 200
    # And it still answers from the store.
    repeat = run_job(restarted, [image_id], [{"name": "grad_cam"}])
    assert repeat["model_runs"] == 0


def test_job_left_running_by_a_dead_process_reads_as_cancelled(make_app, client, image_id):
    job = run_job(client, [image_id])
    client.application.extensions["convscope"].shutdown()
    data_dir = client.application.extensions["convscope"].settings.data_dir
    record_path = data_dir / "jobs" / f"{job['id']}.json"
    record = json.loads(record_path.read_text())
    record.update(status="running", finished=None, owner="999999999:12345")
    record_path.write_text(json.dumps(record))
    restarted = make_app().test_client()
    again = restarted.get(f"/api/v1/jobs/{job['id']}").json
    assert again["status"] == "cancelled" and again["error"]["code"] == "E_CANCELLED"


def test_shutdown_cancels_queued_and_running_jobs_with_a_recorded_status(make_app, tmp_path):
    directory = write_checkpoint_dir(tmp_path / "slow", factory="SlowNet", size=48)
    app = make_app(directory=directory, batch_size=4, max_cost=100000)
    client = app.test_client()
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    long = [{"name": "occlusion", "params": {"window": 1, "stride": 1, "engine": "dense"}}]
    running = submit(client, [image], long).json["id"]
    queued = submit(client, [image], long).json["id"]
    wait_job(client, running, until=lambda job: job["status"] == "running")
    app.extensions["convscope"].shutdown(timeout=10)
    for job_id in (running, queued):
        job = client.get(f"/api/v1/jobs/{job_id}").json
        assert job["status"] == "cancelled", job_id
        assert "shut down" in job["error"]["message"]
    response = submit(client, [image])
    assert response.status_code == 503 and response.json["error"]["code"] == "E_BUSY"


@pytest.mark.slow
def test_a_second_server_process_sees_progress_and_can_cancel(make_app, tmp_path):
    """Two apps on one data directory stand for two gunicorn workers: a request may reach
    the one that does not run the job."""
    directory = write_checkpoint_dir(tmp_path / "slow", factory="SlowNet", size=48)
    owner = make_app(directory=directory, batch_size=4, max_cost=100000).test_client()
    other = make_app(directory=directory).test_client()
    image = upload(owner, (png_bytes(seed=3), "photo.png"))[0]["id"]
    slow = {"window": 1, "stride": 1, "engine": "dense"}      # dense: seconds, not instant
    job_id = submit(owner, [image], [{"name": "occlusion", "params": slow}]).json["id"]
    seen = wait_job(other, job_id, timeout=15, until=lambda job: job["progress"] > 0)
    assert seen["status"] == "running"
    response = other.delete(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    job = wait_job(owner, job_id, timeout=10)
    assert job["status"] == "cancelled"
    assert wait_job(other, job_id, timeout=5)["status"] == "cancelled"


def test_a_full_disk_fails_the_job_with_storage_full_and_the_executor_survives(client, image_id,
                                                                             monkeypatch):
    from app import stores

    real_replace = stores.os.replace

    def disk_full(source, target):
        if "results" in str(target):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(stores.os, "replace", disk_full)
    job = run_job(client, [image_id], [{"name": "saliency"}])
    assert job["status"] == "failed"
    codes = {job["error"]["code"]} | {v["error"]["code"] for v in
                                      job["results"][0]["visualizations"] if v["error"]}
    assert codes == {"E_STORAGE_FULL"}
    page = client.get(f"/jobs/{job['id']}")
    assert page.status_code == 200 and b"E_STORAGE_FULL" in page.data
    data_dir = client.application.extensions["convscope"].settings.data_dir
    assert not [p for p in (data_dir / "results").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    assert run_job(client, [image_id], [{"name": "saliency"}])["status"] == "done"


def test_the_prediction_cache_follows_the_top_k_setting(make_app, tmp_path):
    """The stored top-k list depends on CONVSCOPE_TOP_K, so it is part of the cache key."""
    first = make_app(top_k=2).test_client()
    image = upload(first, (png_bytes(seed=3), "photo.png"))[0]["id"]
    assert len(run_job(first, [image])["results"][0]["predictions"]) == 2
    first.application.extensions["convscope"].shutdown()
    again = make_app(top_k=3).test_client()        # same data directory, restarted
    assert len(run_job(again, [image])["results"][0]["predictions"]) == 3


def test_a_job_names_its_images_as_its_own_user_uploaded_them(client):
    """Two users upload the same bytes under different names: the store keeps one name (the
    latest), but each job shows the name its request gave, never the other user's."""
    data = png_bytes(seed=11)
    [alice] = upload(client, (data, "alice-private.png"))
    [bob] = upload(client, (data, "bob.png"))
    assert alice["id"] == bob["id"] and alice["filename"] == "alice-private.png"
    job = run_job(client, [alice["id"]], filenames={alice["id"]: alice["filename"]})
    assert job["results"][0]["filename"] == "alice-private.png"
    hostile = run_job(client, [bob["id"]], filenames={bob["id"]: "../../etc/<b>x</b>\x07.png"})
    assert "/" not in hostile["results"][0]["filename"]
    assert "\x07" not in hostile["results"][0]["filename"]
    for bad in ({alice["id"]: 3}, {"0" * 64: "x.png"}, ["x.png"]):
        response = submit(client, [alice["id"]], filenames=bad)
        assert response.status_code == 400 and response.json["error"]["code"] == "E_BAD_REQUEST"


def test_the_workbench_form_names_images_as_uploaded(client, monkeypatch):
    from app.stores import ImageStore
    from tests.web.conftest import csrf_from

    real_put = ImageStore.put

    def put_then_someone_else_uploads(self, ingested):
        record = real_put(self, ingested)
        real_put(self, dataclasses.replace(ingested, filename="someone-else.png"))
        return record

    monkeypatch.setattr(ImageStore, "put", put_then_someone_else_uploads)
    token = csrf_from(client.get("/").data)
    response = client.post("/", data={"csrf_token": token, "method": "grad_cam",
                                      "image": (io.BytesIO(png_bytes(seed=12)), "mine.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 303, response.data[:500]
    job = wait_job(client, response.headers["Location"].rsplit("/", 1)[1])
    assert job["results"][0]["filename"] == "mine.png"


def test_job_owner_liveness_without_proc(monkeypatch) -> None:
    import os
    import subprocess
    import sys

    from app.jobs import record

    monkeypatch.setattr(record, "_start_time", lambda pid: "?")
    assert record.owner_alive(f"{os.getpid()}:?")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    assert not record.owner_alive(f"{int(finished.stdout)}:?")
    assert not record.owner_alive("not-a-pid:?")


def test_a_job_predicts_each_image_once(client, image_id, monkeypatch) -> None:
    """The executor hands its prediction to every method instead of each predicting again."""
    from model_adapters.base import LoadedModel

    calls = []
    original_predict = LoadedModel.predict
    monkeypatch.setattr(LoadedModel, "predict",
                        lambda self, batch: calls.append(1) or original_predict(self, batch))
    job = run_job(client, [image_id], [{"name": "saliency", "params": {}},
                                       {"name": "grad_cam", "params": {}}])
    assert job["status"] == "done"
    assert len(calls) == 1
