"""Job cost and fairness (issue 13): a job-level cost limit, cancelling a waiting job frees
its place in the queue, and jobs interleave so a short job never waits for a long one."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.web.conftest import png_bytes, submit, upload, wait_job, write_checkpoint_dir


def test_cancelling_a_waiting_job_frees_its_place_in_the_queue(make_app):
    app = make_app(queue_size=1, retry_after_s=3)
    client = app.test_client()
    executor = app.extensions["convscope"].executor
    gate, started = threading.Event(), threading.Event()
    original = executor._start

    def held(job):          # the executor thread stays in the first job's start until released
        started.set()
        gate.wait(10)
        return original(job)

    executor._start = held
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    first = submit(client, [image]).json["id"]
    assert started.wait(5)
    waiting = submit(client, [image]).json["id"]                 # fills the queue of one
    assert submit(client, [image]).json["error"]["code"] == "E_BUSY"
    assert client.delete(f"/api/v1/jobs/{waiting}").json["status"] == "cancelled"
    assert client.get("/api/v1/ready").status_code == 200
    response = submit(client, [image])                           # its place is free again
    assert response.status_code == 202, response.json
    gate.set()
    assert wait_job(client, first)["status"] == "done"
    assert wait_job(client, response.json["id"])["status"] == "done"
    assert wait_job(client, waiting)["status"] == "cancelled"


def test_job_cost_counts_methods_images_and_targets(make_app):
    # The methods' own evaluations; what faithfulness scores add is tested in
    # tests/web/test_faithfulness_jobs.py.
    app = make_app(max_job_cost=24, faithfulness=False)
    client = app.test_client()
    images = [item["id"] for item in upload(client, (png_bytes(seed=1), "a.png"),
                                            (png_bytes(seed=2), "b.png"))]
    saliency_and_cam = [{"name": "saliency", "params": {"smoothgrad_samples": 0}},
                        {"name": "grad_cam"}, {"name": "cam"}]
    # 3 evaluations x 2 images x 4 targets = 24: at the limit, accepted.
    ok = submit(client, images, saliency_and_cam, targets=["cat", "dog", "bird", "fish"])
    assert ok.status_code == 202, ok.json
    # Integrated gradients' 32 steps (and its completeness pass) make it 37 x 2 x 1 = 74.
    over = submit(client, images, [*saliency_and_cam,
                                   {"name": "integrated_gradients", "params": {"steps": 32}}])
    assert over.status_code == 422
    assert "74 model evaluations" in over.json["error"]["message"]
    assert "limit of 24" in over.json["error"]["message"]
    # A true label adds the predicted and the true class (a possible failure case): with
    # three explicit targets and "fish" as true label that is 5 targets per image, 30 in all.
    with_labels = submit(client, images, saliency_and_cam, targets=["cat", "dog", "bird"],
                         true_labels={images[0]: "fish", images[1]: "fish"})
    assert with_labels.status_code == 422
    assert "30 model evaluations" in with_labels.json["error"]["message"]
    wait_job(client, ok.json["id"])


@pytest.mark.slow
def test_a_short_job_finishes_in_seconds_behind_a_long_occlusion_job(make_app, tmp_path):
    directory = write_checkpoint_dir(tmp_path / "slow", factory="SlowNet", size=48)
    # Without faithfulness scores, which would make the short job 660 evaluations longer.
    app = make_app(directory=directory, batch_size=4, max_cost=100000, max_job_cost=100000,
                   faithfulness=False)
    client = app.test_client()
    image = upload(client, (png_bytes(size=(48, 48), seed=5), "photo.png"))[0]["id"]
    # 2304 one-pixel windows at 4 per 30 ms forward: about 17 s alone (dense: the incremental
    # engine would recompute only a few pixels of each copy and finish at once).
    long_job = submit(client, [image], [{"name": "occlusion",
                                         "params": {"window": 1, "stride": 1,
                                                    "engine": "dense"}}]).json["id"]
    wait_job(client, long_job, until=lambda job: job["progress"] > 0.02)
    submitted = time.monotonic()
    short_job = submit(client, [image], [{"name": "grad_cam"}, {"name": "saliency"}],
                       targets=["predicted", "fish"]).json["id"]
    short = wait_job(client, short_job, timeout=30)
    waited = time.monotonic() - submitted
    long_state = client.get(f"/api/v1/jobs/{long_job}").json
    assert short["status"] == "done", short
    assert long_state["status"] == "running" and long_state["progress"] < 0.9
    assert waited < 6.0, f"the short job waited {waited:.1f} s behind the long one"
    client.delete(f"/api/v1/jobs/{long_job}")
    assert wait_job(client, long_job, timeout=10)["status"] == "cancelled"

    # The maps computed in the long job's turns equal the same maps computed alone.
    alone = make_app(directory=directory, data_dir=tmp_path / "alone", batch_size=4,
                     faithfulness=False)
    alone_client = alone.test_client()
    upload(alone_client, (png_bytes(size=(48, 48), seed=5), "photo.png"))
    again = wait_job(alone_client, submit(alone_client, [image], [{"name": "grad_cam"},
                                                                  {"name": "saliency"}],
                                          targets=["predicted", "fish"]).json["id"])
    assert again["model_runs"] > 0 and again["cache_hits"] == 0
    for first, second in zip(short["results"][0]["visualizations"],
                             again["results"][0]["visualizations"]):
        for panel_a, panel_b in zip(first["panels"], second["panels"]):
            array_a = np.load(_io(client.get(panel_a["array_url"]).data))
            array_b = np.load(_io(alone_client.get(panel_b["array_url"]).data))
            np.testing.assert_array_equal(array_a, array_b)


def _io(data: bytes):
    import io

    return io.BytesIO(data)
