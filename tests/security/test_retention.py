"""Results store quota and time-to-live: least recently used first, run by the executor thread
(never an HTTP thread), and expired URLs answer 410 E_RESULT_EXPIRED rather than 404."""
from __future__ import annotations

import os
import threading
import time

import pytest

from app.errors import NotFound, ResultExpired
from app.jobs.kinds import spec_from_record
from app.jobs.store import JobStore
from app.retention import Retention
from app.stores import ImageStore, ResultStore, result_key
from tests.security.conftest import assert_html_error, assert_json_error
from tests.web.conftest import png_bytes, run_job, upload, wait_job

KIB = 1024


@pytest.fixture
def stores(tmp_path):
    return (ImageStore(tmp_path / "images"), ResultStore(tmp_path / "results"),
            JobStore(tmp_path / "jobs", spec_from_record))


def _result(results: ResultStore, name: str, size: int, age_s: float = 0.0) -> str:
    key = result_key(name=name)
    results.put(key, {"kind": "test"}, {"panel-0-values.npy": b"x" * size})
    stamp = time.time() - age_s
    os.utime(results.root / key, (stamp, stamp))
    return key


def _image(images: ImageStore, seed: int, age_s: float = 0.0) -> str:
    from app.ingest import ingest_image

    record = images.put(ingest_image(png_bytes(seed=seed), f"{seed}.png"))
    stamp = time.time() - age_s
    os.utime(images.root / f"{record.id}.png", (stamp, stamp))
    return record.id


def _retention(stores, **limits) -> Retention:
    images, results, jobs = stores
    return Retention(images=images, results=results, jobs=jobs, **limits)


def test_time_to_live_expires_old_results_images_and_jobs(stores):
    images, results, jobs = stores
    old_key, new_key = _result(results, "old", 100, age_s=7200), _result(results, "new", 100)
    old_image, new_image = _image(images, 1, age_s=7200), _image(images, 2)
    old_job = "a" * 32
    (jobs.root / f"{old_job}.json").write_text("{}")
    os.utime(jobs.root / f"{old_job}.json", (time.time() - 7200,) * 2)
    report = _retention(stores, max_bytes=None, ttl_s=3600).run()
    assert (report.removed_results, report.removed_images, report.removed_jobs) == (1, 1, 1)
    assert results.get(old_key) is None and results.get(new_key) is not None
    with pytest.raises(ResultExpired) as caught:
        results.file(old_key, "result.json")
    assert caught.value.http_status == 410 and caught.value.code == "E_RESULT_EXPIRED"
    with pytest.raises(ResultExpired):
        images.get(old_image)
    with pytest.raises(ResultExpired):
        images.png_path(old_image)
    assert images.get(new_image).id == new_image
    with pytest.raises(ResultExpired):
        jobs.get(old_job)
    # Never-seen ids are still plain 404s.
    with pytest.raises(NotFound):
        results.file("b" * 64, "result.json")
    with pytest.raises(NotFound):
        jobs.get("c" * 32)


def test_quota_evicts_least_recently_used_first(stores):
    images, results, _ = stores
    keys = [_result(results, f"r{number}", 10 * KIB, age_s=1000 - number * 100)
            for number in range(6)]                        # keys[0] is the oldest
    # Reusing the oldest makes it the most recently used.
    results.touch(keys[0])
    retention = _retention(stores, max_bytes=35 * KIB, ttl_s=None)
    report = retention.run()
    left = {key for key in keys if results.get(key) is not None}
    assert report.stored_bytes <= 35 * KIB * 0.9 + 2 * KIB
    assert keys[0] in left                                  # touched: kept
    assert keys[1] not in left and keys[2] not in left      # oldest untouched: gone first
    assert keys[5] in left
    assert all(results.expired(key) for key in set(keys) - left)


def test_images_needed_by_queued_jobs_are_protected(stores):
    images, results, _ = stores
    needed = _image(images, 3, age_s=9000)
    spare = _image(images, 4, age_s=9000)
    _retention(stores, max_bytes=1, ttl_s=60).run(protected_images={needed})
    assert images.exists(needed) and not images.exists(spare)


def test_a_recomputed_result_is_no_longer_expired(stores):
    _, results, _ = stores
    key = _result(results, "again", 10, age_s=99999)
    _retention(stores, max_bytes=None, ttl_s=60).run()
    assert results.expired(key)
    results.put(key, {"kind": "test"}, {"panel-0-values.npy": b"y"})
    assert not results.expired(key) and results.file(key, "panel-0-values.npy")


def test_uploading_an_expired_image_again_revives_it(stores):
    images, _, _ = stores
    image = _image(images, 5, age_s=99999)
    _retention(stores, max_bytes=None, ttl_s=60).run()
    with pytest.raises(ResultExpired):
        images.get(image)
    assert _image(images, 5) == image and images.get(image).id == image


def test_due_is_cheap_and_follows_interval_and_writes(stores):
    images, results, _ = stores
    clock = [1000.0]
    retention = _retention(stores, max_bytes=50 * KIB, ttl_s=3600)
    retention.clock = lambda: clock[0]
    assert retention.due()                  # never ran
    retention.run()
    assert not retention.due()
    _result(results, "w", 60 * KIB)         # this process wrote past the quota
    assert retention.due()
    retention.run()
    assert not retention.due()
    clock[0] += retention.interval_s
    assert retention.due()
    assert not _retention(stores, max_bytes=None, ttl_s=None).due()   # both off


def test_crash_leftovers_are_removed(stores):
    images, results, jobs = stores
    stale = results.root / ".tmp-deadbeef"
    stale.mkdir()
    (stale / "x").write_bytes(b"1")
    stale_file = jobs.root / ".tmp-1234-x.json"
    stale_file.write_text("{}")
    fresh = images.root / ".tmp-fresh.png"
    fresh.write_bytes(b"1")
    for path in (stale, stale_file):
        os.utime(path, (time.time() - 7200,) * 2)
    _retention(stores, max_bytes=None, ttl_s=3600).run()
    assert not stale.exists() and not stale_file.exists() and fresh.exists()


def test_tombstones_are_bounded(stores):
    _, results, _ = stores
    for number in range(5):
        results.tombstones.add(result_key(n=number))
    assert results.tombstones.prune(older_than=0, keep_at_most=2) == 3
    assert len(os.listdir(results.tombstones.root)) == 2


# --- through the server -----------------------------------------------------------------------

def _entries_threads(monkeypatch) -> list[str]:
    """Record which thread lists a store (the expensive part of a pass)."""
    seen: list[str] = []
    for store in (ImageStore, ResultStore):
        original = store.entries

        def spy(self, _original=original):
            seen.append(threading.current_thread().name)
            return _original(self)

        monkeypatch.setattr(store, "entries", spy)
    return seen


def test_quota_is_enforced_after_jobs_on_the_executor_thread(make_app, monkeypatch):
    threads = _entries_threads(monkeypatch)
    app = make_app(store_max_mb=0.03, result_ttl_hours=0)      # ~30 KiB: a few results
    client = app.test_client()
    executor = app.extensions["convscope"].executor
    first_image = upload(client, (png_bytes(seed=31), "first.png"))[0]["id"]
    first = run_job(client, [first_image], [{"name": "grad_cam"}, {"name": "saliency"}])
    for seed in range(32, 36):
        image = upload(client, (png_bytes(seed=seed), f"{seed}.png"))[0]["id"]
        run_job(client, [image], [{"name": "grad_cam"}, {"name": "saliency"}])
    deadline = time.monotonic() + 10
    while executor.retention.due() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads and set(threads) == {"convscope-executor"}, threads
    total = sum(entry.size for store in (app.extensions["convscope"].results,
                                         app.extensions["convscope"].images)
                for entry in store.entries())
    assert total <= 0.03 * 1024 * 1024
    # The first job's files are gone, and say so.
    panel = first["results"][0]["visualizations"][0]["panels"][0]
    assert_json_error(client.get(panel["overlay_url"]), 410, "E_RESULT_EXPIRED")
    assert_json_error(client.get(f"/api/v1/images/{first_image}"), 410, "E_RESULT_EXPIRED")
    view = client.get(f"/api/v1/jobs/{first['id']}").json
    assert view["expired"] is True
    assert view["results"][0]["visualizations"][0]["error"]["code"] == "E_RESULT_EXPIRED"
    page = client.get(f"/jobs/{first['id']}")
    assert page.status_code == 200 and b"E_RESULT_EXPIRED" in page.data
    assert b"have expired" in page.data


def test_expired_job_pages_say_so(make_app):
    app = make_app(result_ttl_hours=1)
    client = app.test_client()
    services = app.extensions["convscope"]
    image = upload(client, (png_bytes(seed=41), "a.png"))[0]["id"]
    job = run_job(client, [image])
    record = services.jobs.root / f"{job['id']}.json"
    os.utime(record, (time.time() - 7200,) * 2)
    services.executor.retention.run()
    assert_json_error(client.get(f"/api/v1/jobs/{job['id']}"), 410, "E_RESULT_EXPIRED")
    response = client.get(f"/jobs/{job['id']}", headers={"Accept": "text/html"})
    assert_html_error(response, 410, "E_RESULT_EXPIRED")
    assert b"expired" in response.data
    # A new job still works (the image was recent enough to stay).
    assert wait_job(client, client.post("/api/v1/jobs", json={
        "images": [image], "visualizations": [{"name": "grad_cam"}]}).json["id"])["status"] \
        == "done"


def test_reused_results_count_as_used(make_app):
    app = make_app(result_ttl_hours=1)
    client = app.test_client()
    services = app.extensions["convscope"]
    image = upload(client, (png_bytes(seed=42), "a.png"))[0]["id"]
    job = run_job(client, [image])
    keys = {panel["json_url"].split("/")[-2]
            for panel in job["results"][0]["visualizations"][0]["panels"]}
    for key in keys:
        os.utime(services.results.root / key, (time.time() - 3000,) * 2)
    again = run_job(client, [image])                     # answered from the store: touched
    assert again["cache_hits"] >= 1
    for key in keys:
        assert time.time() - os.stat(services.results.root / key).st_mtime < 60


def test_submitting_a_job_keeps_its_images_alive(make_app):
    app = make_app(result_ttl_hours=1)
    client = app.test_client()
    services = app.extensions["convscope"]
    image = upload(client, (png_bytes(seed=43), "a.png"))[0]["id"]
    os.utime(services.images.root / f"{image}.png", (time.time() - 3000,) * 2)
    run_job(client, [image])
    assert time.time() - os.stat(services.images.root / f"{image}.png").st_mtime < 60
