"""Races between submit, cancel, the executor loop and shutdown, driven deterministically."""
from __future__ import annotations

import threading

import pytest

from tests.web.conftest import png_bytes, submit, upload, wait_job


def test_shutdown_cancels_a_job_that_is_live_but_not_in_the_queue(held_executor):
    """A submit racing with shutdown can enqueue after the queue was emptied; the sweep over
    the process's live jobs must still record it as cancelled, never leave it queued."""
    from app.jobs.record import Job

    app, client, executor, image, gate, started = held_executor
    first = submit(client, [image]).json["id"]
    assert started.wait(5)
    spec = executor.jobs.live(first).spec
    stray = Job(executor.jobs.new_id(), spec)
    executor.jobs.add(stray)                 # recorded, as submit does, but never enqueued
    threading.Timer(0.2, gate.set).start()
    executor.shutdown(timeout=10)
    record = client.get(f"/api/v1/jobs/{stray.id}").json
    assert record["status"] == "cancelled" and "shut down" in record["error"]["message"]
    assert client.get(f"/api/v1/jobs/{first}").json["status"] == "cancelled"


def test_submit_after_shutdown_began_is_recorded_as_cancelled(held_executor):
    app, client, executor, image, gate, started = held_executor
    submit(client, [image])
    assert started.wait(5)
    # Shutdown begins (and sweeps) right after submit's first check saw it not stopping.
    answers = iter([False])
    executor._stopping.is_set = lambda: next(answers, True)
    try:
        response = submit(client, [image])
    finally:
        del executor._stopping.is_set
    assert response.status_code == 202
    job = client.get(f"/api/v1/jobs/{response.json['id']}").json
    assert job["status"] == "cancelled"


def test_a_job_cancelled_after_the_loop_took_it_is_not_restarted(held_executor):
    app, client, executor, image, gate, started = held_executor
    submit(client, [image])
    assert started.wait(5)
    queued = submit(client, [image]).json["id"]
    job = executor.jobs.live(queued)
    executor.cancel(queued)                  # cancelled while queued ...
    from app.jobs.executor import Executor

    assert Executor._start(executor, job) is None    # ... and the loop reaches it anyway
    assert job.status == "cancelled" and job.started is None
    assert "before it started" in job.error["message"]
    gate.set()
    assert wait_job(client, queued)["status"] == "cancelled"


def test_a_running_job_stops_when_the_executor_is_stopping(make_app):
    """Even if shutdown never saw it as the current job, a run checks ``stopping``."""
    from app.errors import Cancelled
    from app.jobs.record import Job
    from app.jobs.visualize import VisualizeRun

    app = make_app()
    client = app.test_client()
    executor = app.extensions["convscope"].executor
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    done = wait_job(client, submit(client, [image]).json["id"])
    assert done["status"] == "done"
    job = Job(executor.jobs.new_id(), executor.jobs.get(done["id"]).spec)
    executor._stopping.set()
    try:
        with pytest.raises(Cancelled, match="shut down"):
            VisualizeRun(app.extensions["convscope"], job,
                         stopping=executor._stopping.is_set).run()
    finally:
        executor._stopping.clear()
    assert job.model_runs == 0 and job.cache_hits == 0
