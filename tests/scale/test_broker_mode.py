"""Broker mode end to end, against a real redis-server, real ``convscope worker`` processes and
real gunicorn web processes (tests/scale/conftest.py): nothing here mocks Celery or Redis."""
from __future__ import annotations

import json
import re
import time

import requests

from benchmarks.cluster import job_api, wait_for_status
from tests.scale.conftest import (KILLED_OCCLUSION, LONG_OCCLUSION, QUICK, WEB_QUEUE_SIZE,
                                  fresh_image, submit, submitted, wait_until)

TERMINAL = ("done", "failed", "cancelled")


def record_of(cluster, job_id: str) -> dict:
    return json.loads((cluster.data_dir / "jobs" / f"{job_id}.json").read_text())


def running_worker(cluster, job_id: str, timeout: float = 60.0):
    return wait_until(lambda: cluster.worker_running(job_id), timeout,
                      f"job {job_id[:8]} running on a live worker")


def test_a_job_submitted_on_one_web_process_is_polled_and_rendered_on_another(web, image_id):
    a, b = (server.base_url for server in web.webs)
    job_id = submitted(a, image_id, QUICK)
    job = wait_for_status(b, job_id, TERMINAL, 120)
    assert job["status"] == "done", job["error"]
    panel = job["results"][0]["visualizations"][0]["panels"][0]
    files = [value for key, value in panel.items() if key.endswith("_url") and value]
    assert files
    for url in files:
        fetched = requests.get(b + url, timeout=10)
        assert fetched.status_code == 200, url
    page = requests.get(b + job["url"], timeout=10)
    assert page.status_code == 200 and job_id[:8] in page.text


def test_workers_are_listed_with_their_devices_and_what_they_run(web, image_id):
    base = web.webs[1].base_url
    listed = requests.get(base + "/api/v1/workers", timeout=10).json()
    live = {worker.pid for worker in web.workers if worker.alive}
    assert {worker["pid"] for worker in listed["workers"]} == live
    assert all(worker["device"] == "cpu" for worker in listed["workers"])
    ready = requests.get(base + "/api/v1/ready", timeout=10)
    assert ready.status_code == 200 and len(ready.json()["workers"]) == len(live)

    job_id = submitted(base, image_id, LONG_OCCLUSION)
    worker = running_worker(web, job_id)
    job = job_api(base, job_id)
    assert job["worker"] == {"host": job["worker"]["host"], "pid": worker.pid, "device": "cpu"}
    running = wait_until(
        lambda: [w for w in requests.get(base + "/api/v1/workers", timeout=10).json()["workers"]
                 if job_id in [j["id"] for j in w["running"]]], 10, "the worker lists its job")
    assert running[0]["pid"] == worker.pid
    page = requests.get(base + "/models", timeout=10).text
    assert "Workers" in page and str(worker.pid) in page and job_id[:8] in page
    requests.delete(f"{base}/api/v1/jobs/{job_id}", timeout=10)
    assert wait_for_status(base, job_id, TERMINAL, 30)["worker"] is None


def test_two_workers_share_a_burst(web, image_id):
    a, b = (server.base_url for server in web.webs)
    jobs = [submitted(a if n % 2 else b, image_id, [{"name": "grad_cam",
                                                     "params": {"relu": n % 2 == 0}}])
            for n in range(6)]
    for job_id in jobs:
        assert wait_for_status(a, job_id, TERMINAL, 120)["status"] == "done"
    ran_on = {record_of(web, job_id)["worker"]["pid"] for job_id in jobs}
    assert len(ran_on) == 2, ran_on


def test_cancel_reaches_the_running_worker_within_two_seconds(web, image_id):
    a, b = (server.base_url for server in web.webs)
    job_id = submitted(a, image_id, LONG_OCCLUSION)
    worker = running_worker(web, job_id)
    wait_until(lambda: job_api(a, job_id)["progress"] > 0.02, 60, "progress")
    asked = time.monotonic()
    response = requests.delete(f"{b}/api/v1/jobs/{job_id}", timeout=10)
    assert response.status_code == 200
    job = wait_for_status(a, job_id, TERMINAL, 10)
    took = time.monotonic() - asked
    assert job["status"] == "cancelled" and took <= 2.0, (job["status"], took)
    assert worker.alive
    # The worker is free again: a quick job runs at once.
    assert wait_for_status(b, submitted(b, image_id, QUICK), TERMINAL, 60)["status"] == "done"


def test_a_cancelled_queued_job_never_runs(web, image_id):
    base = web.webs[0].base_url
    blockers = [submitted(base, fresh_image(web), LONG_OCCLUSION) for _ in range(2)]
    for job_id in blockers:
        running_worker(web, job_id)
    queued = submitted(base, image_id, QUICK)
    assert job_api(base, queued)["status"] == "queued" and job_api(base, queued)["worker"] is None
    assert requests.delete(f"{base}/api/v1/jobs/{queued}", timeout=10).json()["status"] \
        == "cancelled"
    for job_id in blockers:
        requests.delete(f"{base}/api/v1/jobs/{job_id}", timeout=10)
    for job_id in blockers:
        wait_for_status(base, job_id, TERMINAL, 30)
    time.sleep(1.0)             # the queued task reaches a worker, which must skip it
    record = record_of(web, queued)
    assert record["status"] == "cancelled" and record["started"] is None


def test_the_queue_limit_counts_queued_tasks(web, image_id):
    limited = web.webs[1].base_url
    blockers = [submitted(limited, fresh_image(web), LONG_OCCLUSION) for _ in range(2)]
    for job_id in blockers:
        running_worker(web, job_id)
    waiting = [submitted(limited, image_id, QUICK) for _ in range(WEB_QUEUE_SIZE)]
    refused = submit(limited, image_id, QUICK)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "E_BUSY"
    assert int(refused.headers["Retry-After"]) > 0
    for job_id in blockers + waiting:
        requests.delete(f"{limited}/api/v1/jobs/{job_id}", timeout=10)
    for job_id in blockers:
        assert wait_for_status(limited, job_id, TERMINAL, 30)["status"] == "cancelled"


def test_a_timeline_runs_on_a_worker_too(web, image_id):
    base = web.webs[0].base_url
    response = requests.post(base + "/api/v1/timelines", timeout=30, json={
        "images": [image_id], "visualizations": [{"name": "grad_cam"}]})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    timeline = wait_until(
        lambda: (lambda t: t if t["status"] in TERMINAL else None)(
            requests.get(base + response.json()["api_url"], timeout=10).json()),
        120, "the timeline ends")
    assert timeline["status"] == "done", timeline["error"]
    assert record_of(web, job_id)["worker"]["pid"] in {w.pid for w in web.workers}


def test_a_killed_workers_job_finishes_on_the_other(web, image_id):
    a, b = (server.base_url for server in web.webs)
    job_id = submitted(a, image_id, KILLED_OCCLUSION)
    victim = running_worker(web, job_id)
    wait_until(lambda: job_api(a, job_id)["progress"] > 0.05, 60, "progress")
    victim.kill()
    survivor = running_worker(web, job_id, timeout=30)      # claim expiry + resend: seconds
    assert survivor.pid != victim.pid
    job = wait_for_status(b, job_id, TERMINAL, 240)
    assert job["status"] == "done", job["error"]
    record = record_of(web, job_id)
    assert record["deliveries"] == 2 and record["worker"]["pid"] == survivor.pid


def test_three_lost_deliveries_fail_the_job_with_worker_lost(web, image_id):
    base = web.webs[0].base_url
    job_id = submitted(base, image_id, LONG_OCCLUSION)
    for delivery in (1, 2, 3):
        victim = running_worker(web, job_id, timeout=60)
        assert record_of(web, job_id)["deliveries"] == delivery
        wait_until(lambda: job_api(base, job_id)["progress"] > 0.0, 30, "progress")
        victim.kill()
        web.start_worker(wait=False)            # keep two workers alive to take it again
    job = wait_for_status(base, job_id, TERMINAL, 90)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "E_WORKER_LOST", job["error"]
    assert record_of(web, job_id)["deliveries"] == 3


def test_redis_stopped_and_restarted_under_load_loses_no_job(web, image_id):
    a, b = (server.base_url for server in web.webs)
    workers = [worker for worker in web.workers if worker.alive]
    jobs = [submitted(a, image_id, [{"name": "grad_cam", "params": {"relu": n % 2 == 0}}])
            for n in range(4)]
    jobs.append(submitted(b, image_id, [{"name": "saliency",
                                         "params": {"smoothgrad_samples": 8}}]))
    web.stop_redis()
    refused = submit(a, image_id, QUICK)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "E_BROKER_UNAVAILABLE"
    assert int(refused.headers["Retry-After"]) > 0
    assert requests.get(a + "/api/v1/health", timeout=10).status_code == 200
    wait_until(lambda: requests.get(b + "/api/v1/ready", timeout=10).status_code == 503, 10,
               "readiness goes down")
    time.sleep(2.0)             # the workers notice too
    web.start_redis()           # the same port, empty: every queued task is gone
    wait_until(lambda: requests.get(a + "/api/v1/ready", timeout=10).status_code == 200, 30,
               "readiness comes back without a restart")
    late = submitted(b, image_id, QUICK)
    for job_id in jobs + [late]:
        job = wait_for_status(a, job_id, TERMINAL, 180)
        assert job["status"] == "done", (job_id, job["error"])
    assert all(worker.alive for worker in workers)       # none died of the outage
    assert re.search(r"sent \d+ unfinished jobs? again|Redis is empty",
                     "".join(worker.log() for worker in web.workers))
