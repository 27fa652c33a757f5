"""Sanity checks over HTTP: the API (202, status, result object, cancel, errors), the job kind
(cache hit, restart survival), the /models buttons and result page, and the "sanity: ..." link
on every panel of a checked method."""
from __future__ import annotations

import re
import time

import pytest

from tests.web.conftest import csrf_from, png_bytes, run_job, upload, write_checkpoint_dir

RESULT_KEYS = {"method", "checkpoint", "params", "images", "steps", "passed", "threshold"}


def wait_check(client, job_id: str, timeout: float = 60.0, until=None) -> dict:
    until = until or (lambda check: check["status"] in ("done", "failed", "cancelled"))
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/api/v1/sanity/{job_id}")
        assert response.status_code == 200, response.json
        if until(response.json):
            return response.json
        assert time.monotonic() < deadline, f"still {response.json['status']}"
        time.sleep(0.02)


def start(client, **body) -> dict:
    response = client.post("/api/v1/sanity", json={"method": "grad_cam", **body})
    assert response.status_code == 202, response.json
    assert response.headers["Location"] == response.json["api_url"]
    return response.json


def test_post_then_get_gives_the_cli_object(client) -> None:
    created = start(client)
    assert set(created) == {"id", "url", "api_url"}
    assert created["url"] == f"/sanity/{created['id']}"
    check = wait_check(client, created["id"])
    assert check["status"] == "done", check["error"]
    assert RESULT_KEYS <= set(check)
    # No images given: the first two sample photos.
    assert check["images"] == 2 and check["filenames"] == ["chelsea.jpg", "coffee.jpg"]
    assert check["method"] == "grad_cam" and check["checkpoint"] == "tiny.pt"
    assert check["params"]["relu"] is True
    # TinyNet: fc, features.2, features.0 -- from the output down, one step per layer.
    assert [step["randomized"] for step in check["steps"]] == ["fc", "features.2", "features.0"]
    assert all(set(step) == {"randomized", "spearman", "ssim"} for step in check["steps"])
    assert check["passed"] == (check["steps"][-1]["spearman"] < check["threshold"])
    assert check["threshold"] == 0.5 and check["progress"] == 1.0


def test_a_repeat_is_answered_from_the_store(client, app, monkeypatch) -> None:
    first = wait_check(client, start(client, params={"relu": False})["id"])
    assert first["status"] == "done" and first["model_runs"] == 1 and first["cache_hits"] == 0

    import visualizations.sanity

    def must_not_run(*args, **kwargs):
        raise AssertionError("the repeat recomputed the check")

    monkeypatch.setattr(visualizations.sanity, "sanity_check", must_not_run)
    repeat = wait_check(client, start(client, params={"relu": False})["id"])
    assert repeat["status"] == "done", repeat["error"]
    assert repeat["model_runs"] == 0 and repeat["cache_hits"] == 1
    assert repeat["steps"] == first["steps"] and repeat["passed"] == first["passed"]
    # Other parameters are another check, computed anew (here: refused by the stub).
    other = wait_check(client, start(client, params={"relu": True})["id"])
    assert other["status"] == "failed"


def test_stored_image_ids_and_sample_names(client) -> None:
    image = upload(client, (png_bytes(seed=4), "mine.png"))[0]["id"]
    check = wait_check(client, start(client, method="cam", images=[image, "rocket"])["id"])
    assert check["status"] == "done", check["error"]
    assert check["images"] == 2 and check["filenames"] == ["mine.png", "rocket.jpg"]
    assert check["image_ids"][0] == image


@pytest.mark.parametrize("body, status, code", [
    ({"method": "no_such_method"}, 400, "E_UNKNOWN_VISUALIZATION"),
    ({}, 400, "E_BAD_REQUEST"),
    ({"method": "grad_cam", "params": {"relu": "maybe"}}, 400, "E_BAD_PARAMETER"),
    ({"method": "grad_cam", "colour": 1}, 400, "E_BAD_REQUEST"),
    ({"method": "grad_cam", "images": []}, 400, "E_BAD_REQUEST"),
    ({"method": "grad_cam", "images": ["0" * 64]}, 404, "E_NOT_FOUND"),
    ({"method": "grad_cam", "images": ["rocket", "rocket.jpg"]}, 400, "E_BAD_REQUEST"),
    ({"method": "grad_cam", "model": "nope"}, 404, "E_UNKNOWN_MODEL"),
])
def test_bad_requests_are_refused_with_a_code(client, body, status, code) -> None:
    response = client.post("/api/v1/sanity", json=body)
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code


def test_cost_is_bounded_by_max_cost(make_app) -> None:
    # Occlusion, window 8 and stride 8 on TinyNet's 32 px: 4 x 4 windows + the unoccluded pass
    # = 17 evaluations per map, + 1 prediction = 18. The web side counts the most steps (24):
    # 2 probes + 2 images x (1 prediction + 25 maps x 18) = 904, counted by hand.
    body = {"method": "occlusion", "params": {"window": 8, "stride": 8}}
    at_limit = make_app(max_cost=904).test_client()
    assert at_limit.post("/api/v1/sanity", json=body).status_code == 202
    below = make_app(max_cost=903).test_client()
    response = below.post("/api/v1/sanity", json=body)
    assert response.status_code == 422
    assert response.json["error"]["code"] == "E_TOO_EXPENSIVE"
    assert "904" in response.json["error"]["message"]
    assert "CONVSCOPE_MAX_COST" in response.json["error"]["message"]
    # The models page says so instead of offering a button that would be refused.
    page = below.get("/models").get_data(as_text=True)
    assert re.search(r'data-method="occlusion" disabled', page)


def test_the_generic_job_routes_lead_to_the_sanity_check(client) -> None:
    created = start(client)
    assert client.get(f"/jobs/{created['id']}").headers["Location"] == created["url"]
    assert client.get(f"/api/v1/jobs/{created['id']}").headers["Location"] == created["api_url"]
    assert client.get(f"/jobs/{created['id']}/views/detail-0-0").status_code == 404
    wait_check(client, created["id"])


def test_unknown_ids_and_other_kinds_are_not_found(client) -> None:
    assert client.get("/api/v1/sanity/" + "0" * 32).status_code == 404
    assert client.get("/api/v1/sanity/../../etc").status_code == 404
    image = upload(client, (png_bytes(seed=1), "a.png"))[0]["id"]
    job = run_job(client, [image])
    assert client.get(f"/api/v1/sanity/{job['id']}").status_code == 404
    assert client.delete(f"/api/v1/sanity/{job['id']}").status_code == 404


def test_delete_cancels_a_running_check(make_app, tmp_path) -> None:
    slow = write_checkpoint_dir(tmp_path / "slow", factory="SlowNet")
    client = make_app(directory=slow).test_client()
    created = start(client, method="occlusion", params={"window": 8, "stride": 4})
    wait_check(client, created["id"], until=lambda check: check["progress"] > 0)
    response = client.delete(f"/api/v1/sanity/{created['id']}")
    assert response.status_code == 200
    check = wait_check(client, created["id"])
    assert check["status"] == "cancelled" and "steps" not in check


def test_a_finished_check_survives_a_restart(make_app) -> None:
    first = make_app()
    client = first.test_client()
    done = wait_check(client, start(client)["id"])
    first.extensions["convscope"].shutdown(timeout=10)
    again = make_app().test_client()
    restored = again.get(f"/api/v1/sanity/{done['id']}").json
    assert restored["status"] == "done" and restored["steps"] == done["steps"]


# --- pages --------------------------------------------------------------------------------------

def test_models_page_has_a_button_per_method_and_starts_a_check(client, app) -> None:
    page = client.get("/models")
    html = page.get_data(as_text=True)
    methods = [method.name for method in app.extensions["convscope"].visualizations]
    for name in methods:
        assert f'name="method" value="{name}"' in html
    assert html.count('action="/sanity"') == len(methods)       # one form per method
    response = client.post("/sanity", data={"csrf_token": csrf_from(page.data),
                                            "model": "latest", "method": "cam"})
    assert response.status_code == 303
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    check = wait_check(client, job_id)
    assert check["status"] == "done"
    result = client.get(f"/sanity/{job_id}").get_data(as_text=True)
    verdict = "Passed" if check["passed"] else "Failed"
    assert verdict in result and "<svg" in result and "<polyline" in result
    assert result.count("<tr><td>") == len(check["steps"])
    assert f"{check['steps'][-1]['spearman']:.3f}" in result
    # Once checked, the models page links the method's latest result.
    models = client.get("/models").get_data(as_text=True)
    assert re.search(r'class="sanity-link (passed|failed)" href="/sanity/results/[0-9a-f]{64}"',
                     models)


def test_models_page_form_errors_are_shown_on_the_page(client) -> None:
    page = client.get("/models")
    response = client.post("/sanity", data={"csrf_token": csrf_from(page.data),
                                            "method": "no_such_method"})
    assert response.status_code == 400
    assert "E_UNKNOWN_VISUALIZATION" in response.get_data(as_text=True)


def test_panels_link_the_sanity_result_of_their_method(client) -> None:
    image = upload(client, (png_bytes(seed=2), "b.png"))[0]["id"]
    methods = [{"name": "grad_cam"}, {"name": "cam"}]
    before = run_job(client, [image], methods)
    panels = [panel for entry in before["results"][0]["visualizations"]
              for panel in entry["panels"]]
    assert panels and all(panel["sanity"] is None for panel in panels)

    check = wait_check(client, start(client, method="grad_cam")["id"])
    after = run_job(client, [image], methods)
    grad_cam, cam = after["results"][0]["visualizations"]
    for panel in grad_cam["panels"]:
        assert panel["sanity"]["passed"] == check["passed"]
        assert panel["sanity"]["spearman"] == pytest.approx(check["steps"][-1]["spearman"])
        assert client.get(panel["sanity"]["url"]).status_code == 200
    assert all(panel["sanity"] is None for panel in cam["panels"])   # cam was never checked
    page = client.get(f"{after['url']}/views/detail-0-0").get_data(as_text=True)
    word = "passed" if check["passed"] else "failed"
    assert f"sanity: {word} (ρ = {check['steps'][-1]['spearman']:.2f})" in page
    # Other parameters of the same method are a different check: no link.
    other = run_job(client, [image], [{"name": "grad_cam", "params": {"relu": False}}])
    assert all(panel["sanity"] is None
               for panel in other["results"][0]["visualizations"][0]["panels"])


def test_result_page_by_key_and_unknown_keys(client) -> None:
    check = wait_check(client, start(client)["id"])
    page = client.get(check["result_url"])
    assert page.status_code == 200 and "grad_cam" in page.get_data(as_text=True)
    assert client.get("/sanity/results/" + "0" * 64).status_code == 404


def test_sanity_pages_have_no_inline_code(client) -> None:
    from tests.security.test_web_protections import _check_document

    check = wait_check(client, start(client)["id"])
    for path in ("/models", check["url"], check["result_url"]):
        _check_document(client.get(path))
