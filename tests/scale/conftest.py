"""A real cluster for the scale-out tests: Debian's ``redis-server`` on a free loopback port
(persistence off), two ``convscope worker`` processes and two gunicorn web processes in broker
mode, sharing one data directory. Nothing is mocked. Started once for the module (each process
loads the demo model or its listing) and kept at two live workers between tests.

Without ``redis-server`` the tests skip, unless ``CONVSCOPE_REQUIRE_REDIS=1`` (CI) makes that a
failure."""
from __future__ import annotations

import itertools
import os
import time

import pytest
import requests

from benchmarks.cluster import Cluster, iter_logs, redis_server_path
from benchmarks.load import upload

WORKERS = 2
# Dense occlusion, 1225 windows: tens of seconds on the demo model, long enough to kill or
# cancel its worker mid-job.
LONG_OCCLUSION = [{"name": "occlusion", "params": {"window": 16, "stride": 6,
                                                   "engine": "dense"}}]
# Long enough to kill its worker at 5 % and shorter to run again on the survivor (729 windows).
KILLED_OCCLUSION = [{"name": "occlusion", "params": {"window": 16, "stride": 8,
                                                     "engine": "dense"}}]
QUICK = [{"name": "grad_cam"}]
WEB_QUEUE_SIZE = 4      # the second web process's queue limit (the first keeps the default)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if redis_server_path() is None:
        if os.environ.get("CONVSCOPE_REQUIRE_REDIS") == "1":
            pytest.fail("CONVSCOPE_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("needs Debian's redis-server (apt-get install redis-server)")
    root = tmp_path_factory.mktemp("cluster")
    with Cluster(root, env={"CONVSCOPE_UNCERTAINTY": "0"}) as running:
        running.start_redis()
        running.start_workers(WORKERS, 120)
        running.start_web()
        running.start_web(env={"CONVSCOPE_QUEUE_SIZE": str(WEB_QUEUE_SIZE)})
        yield running
        if any(not worker.alive for worker in running.workers[-WORKERS:]):
            print("\n".join(iter_logs(running)))


@pytest.fixture
def web(cluster):
    """The cluster with two live workers again (a test before may have killed some)."""
    live = [worker for worker in cluster.workers if worker.alive]
    for _ in range(WORKERS - len(live)):
        cluster.start_worker()
    return cluster


_seeds = itertools.count(100)


@pytest.fixture
def image_id(cluster) -> str:
    """A new image for each test: a finished map is cached by content, so a long job on an
    image a test before used would end at once."""
    return upload(requests.Session(), cluster.webs[0].base_url, next(_seeds))


def fresh_image(cluster) -> str:
    return upload(requests.Session(), cluster.webs[0].base_url, next(_seeds))


def submit(base_url: str, image_id: str, visualizations: list[dict], **extra) -> requests.Response:
    return requests.post(base_url + "/api/v1/jobs", timeout=30, json={
        "model": "latest", "images": [image_id], "visualizations": visualizations,
        "targets": ["predicted"], "faithfulness": False, **extra})


def submitted(base_url: str, image_id: str, visualizations: list[dict]) -> str:
    response = submit(base_url, image_id, visualizations)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")
