"""The HTML pages: workbench, job, models, errors; the no-JavaScript form path; escaping."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest

from tests.web.conftest import csrf_from, png_bytes, run_job, upload, wait_job, wait_ready

HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"


def test_workbench_lists_models_methods_and_classes(client):
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "tiny.pt" in html and ">latest<" in html
    assert "broken.pt" in html and "could not be loaded: E_CHECKPOINT" in html
    for name in ("saliency", "integrated_gradients", "occlusion", "partial_occlusion", "cam",
                 "grad_cam", "guided_grad_cam"):
        assert f'name="method" value="{name}"' in html
    # Generated parameter controls: label, help, bounds, default, paper link.
    occlusion_window = re.search(r'<input type="number" id="p-occlusion-window"[^>]*>', html,
                                 re.S).group(0)
    assert 'min="1"' in occlusion_window and 'placeholder="auto"' in occlusion_window
    assert 'for="p-occlusion-window"' in html and 'id="p-occlusion-window-help"' in html
    assert re.search(r'<select id="p-grad_cam-layer"[^>]*>.*?<option value="features\.', html,
                     re.S)
    assert 'href="https://arxiv.org/' in html
    assert '<datalist id="class-names">' in html and '<option value="fish">' in html
    assert 'type="file" name="image" multiple' in html


def test_workbench_model_query_and_unknown_model(client):
    model_id = next(m["id"] for m in client.get("/api/v1/models").json["models"] if m["ok"])
    assert client.get(f"/?model={model_id}").status_code == 200
    response = client.get("/?model=nope")
    assert response.status_code == 404 and b"E_UNKNOWN_MODEL" in response.data


def test_no_javascript_form_uploads_and_starts_a_job(client):
    page = client.get("/")
    form = {"csrf_token": csrf_from(page.data), "method": ["grad_cam", "occlusion"],
            "param.occlusion.window": "8", "param.grad_cam.relu": ["false", "true"],
            "target_mode": "predicted", "true_label": "",
            "image": [(io.BytesIO(png_bytes(seed=5)), "one.png"),
                      (io.BytesIO(png_bytes(seed=6)), "two.png")]}
    response = client.post("/", data=form, content_type="multipart/form-data")
    assert response.status_code == 303
    job_url = response.headers["Location"]
    assert re.fullmatch(r"/jobs/[0-9a-f]{32}", job_url)
    job = wait_job(client, job_url.rsplit("/", 1)[1])
    assert job["status"] == "done" and len(job["results"]) == 2
    occlusion = job["results"][0]["visualizations"][1]
    assert occlusion["name"] == "occlusion" and occlusion["params"]["window"] == 8
    assert job["results"][0]["visualizations"][0]["params"]["relu"] is True


def test_no_javascript_form_errors_rerender_the_workbench(client):
    page = client.get("/")
    form = {"csrf_token": csrf_from(page.data), "param.occlusion.window": "0",
            "method": ["occlusion"], "image": [(io.BytesIO(png_bytes(seed=5)), "one.png")]}
    response = client.post("/", data=form, content_type="multipart/form-data")
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "E_BAD_PARAMETER" in html and 'role="alert"' in html
    assert re.search(r'value="occlusion"\s*checked', html)       # the choices are kept
    response = client.post("/", data={"csrf_token": csrf_from(page.data)},
                           content_type="multipart/form-data")
    assert response.status_code == 400 and b"E_BAD_REQUEST" in response.data


def between(html: str, start: str, end: str) -> str:
    begin = html.index(start)
    return html[begin:html.index(end, begin)]


def test_job_page_grid_failures_first_and_views_on_their_own_pages(client):
    images = upload(client, (png_bytes(seed=7), "good.png"), (png_bytes(seed=8), "bad.png"))
    ids = [image["id"] for image in images]
    first = run_job(client, ids)
    predicted = first["results"][1]["predictions"][0]
    wrong = next(label for label in ("cat", "dog") if label != predicted["label"])
    methods = [{"name": "grad_cam"}, {"name": "saliency"}, {"name": "partial_occlusion"}]
    job = run_job(client, ids, methods, true_labels={ids[1]: wrong})
    page = f"/jobs/{job['id']}"
    html = client.get(page).get_data(as_text=True)
    assert 'data-finished="true"' in html

    # The job page is the grid: rows of images (failure cases first), columns of methods.
    grid = between(html, '<table class="results-grid', "</table>")
    assert 'has-failures' in grid and 'data-columns="3"' in grid
    assert '<section class="view' not in html             # views are fetched, not inlined
    rows = re.findall(r'<tr class="grid-row( failure)?" data-row="(\d)"', grid)
    assert rows == [(" failure", "1"), ("", "0")]                    # failure case first
    # A failure row shows the predicted and the true class side by side, in that order.
    failure_cell = between(grid, 'id="cell-1-1"', "</td>")
    assert re.findall(r'cell-role role-(\w+)">(\w+): (\w+)', failure_cell) == [
        ("predicted", "pred", predicted["label"]), ("true", "true", wrong)]
    assert len(re.findall(r'class="layer overlay map-image grid-overlay"',
                          between(grid, 'id="cell-0-1"', "</td>"))) == 1
    # Partial occlusion maps three classes; the cell shows the first and says how many more.
    assert re.search(r'class="cell-more" title="In the detail: \w+, \w+">\+2<',
                     between(grid, 'id="cell-0-2"', "</td>"))
    # Every picture has its size before it loads; the first rows load at once, later lazily.
    for tag in re.findall(r"<img [^>]*>", html):
        assert 'width="32" height="32"' in tag and 'loading="eager"' in tag, tag
    views = {f"detail-{row}-{method}" for row in (0, 1) for method in range(3)}
    views |= {f"compare-image-{row}" for row in (0, 1)}
    views |= {f"compare-method-{method}" for method in range(3)}
    links = set(re.findall(rf'href="{page}/views/([\w-]+)" (?:class="compare-link[^"]*" )?'
                           r'data-view="([\w-]+)"', grid))
    assert links == {(view, view) for view in views}

    # Each view is a page of its own (no JavaScript needed) and a fragment for the script.
    for view in views:
        full = client.get(f"{page}/views/{view}")
        assert full.status_code == 200, view
        fragment = client.get(f"{page}/views/{view}?fragment=1").get_data(as_text=True)
        assert fragment.lstrip().startswith('<section class="view ')
        assert f'id="{view}"' in fragment
        assert "<html" not in fragment and "<html" in full.get_data(as_text=True)
        for url in set(re.findall(r'src="(/api/v1/[^"]+)"', fragment)):
            assert client.get(url).status_code == 200, url

    # A detail: the full panels of one image and method, with what a reader needs.
    detail = client.get(f"{page}/views/detail-1-1?fragment=1").get_data(as_text=True)
    assert "failure case" in detail and "Saliency" in detail
    assert detail.count('<figure class="panel panel-heatmap"') == 2     # predicted and true
    assert 'class="opacity-slider"' in detail and 'class="layer overlay map-image"' in detail
    assert "data-display='" in detail and "data-array-url=" in detail
    assert "Own scale: values above the 99.5th percentile saturate." in detail
    assert "overlay PNG" in detail and ".npy" in detail and ">JSON<" in detail
    for tag in re.findall(r"<img [^>]*>", detail):
        assert 'width="32" height="32"' in tag and 'loading="lazy"' in tag, tag
    assert f'href="{page}#cell-1-1"' in detail                         # back to the grid
    assert "Own scale: full range: minimum to maximum." in client.get(
        f"{page}/views/detail-1-0?fragment=1").get_data(as_text=True)
    partial = client.get(f"{page}/views/detail-0-2?fragment=1").get_data(as_text=True)
    assert re.search(r'<img class="illustration" [^>]* width="32" height="32">', partial)
    assert "Own scale: fixed scale from 0 to 1." in partial
    # The image's comparison holds its picture, top-k predictions and every method's map.
    image = client.get(f"{page}/views/compare-image-1?fragment=1").get_data(as_text=True)
    assert "<meter" in image and "true-class" in image
    assert image.count('class="compare-item"') == 3 * 2
    method = client.get(f"{page}/views/compare-method-0?fragment=1").get_data(as_text=True)
    assert method.count('class="compare-item"') == 3                 # 2 + 1 maps
    for bad in ("detail-2-0", "detail-0-3", "compare-image-9", "compare-method-3", "nope",
                "detail-01-0",
                "detail-0-0-0", "..%2F..%2Fetc"):
        response = client.get(f"{page}/views/{bad}")
        assert response.status_code == 404 and b"E_NOT_FOUND" in response.data, bad


def test_views_of_a_running_job_lead_back_to_its_page(held_executor):
    _, client, _, image, gate, _ = held_executor
    job_id = client.post("/api/v1/jobs", json={"images": [image], "visualizations": [
        {"name": "grad_cam"}]}).json["id"]
    response = client.get(f"/jobs/{job_id}/views/detail-0-0")
    assert response.status_code == 303 and response.headers["Location"] == f"/jobs/{job_id}"
    gate.set()
    wait_job(client, job_id)


def test_the_static_views_open_by_fragment_without_javascript(client):
    css = client.get("/static/css/convscope.css").get_data(as_text=True)
    assert re.search(r"\.view \{ display: none;", css)
    assert "html:not(.js) .view:target, .view.open { display: block; }" in css
    for asset in ("/static/js/maps.js", "/static/js/results.js", "/static/js/has-js.js"):
        assert client.get(asset).status_code == 200, asset


def test_the_api_panels_carry_their_display(client):
    image = upload(client, (png_bytes(seed=12), "one.png"))[0]["id"]
    job = run_job(client, [image], [{"name": "saliency"}, {"name": "cam"},
                                    {"name": "partial_occlusion"}])
    saliency, cam, partial = job["results"][0]["visualizations"]
    display = saliency["panels"][0]["display"]
    array = np.load(io.BytesIO(client.get(saliency["panels"][0]["array_url"]).data))
    assert display["scale"] == "percentile" and display["clip_percentile"] == 99.5
    assert display["range"] == pytest.approx([array.min(), np.percentile(array, 99.5)], rel=1e-5)
    assert display["ranges"]["100"] == pytest.approx([array.min(), array.max()])
    assert display["size"] == [32, 32] and display["smoothing_sigma_px"] == 1.0
    assert saliency["panels"][0]["value_range"] == pytest.approx([array.min(), array.max()])
    assert cam["panels"][0]["display"]["scale"] == "full"
    assert cam["panels"][0]["display"]["smoothing_sigma_px"] is None
    assert {p["display"]["scale"] for p in partial["panels"] if p["kind"] == "heatmap"} == {"fixed"}
    assert all(p["display"] is None for p in partial["panels"] if p["kind"] == "image")
    assert [p["primary"] for p in saliency["panels"]] == [True]
    assert saliency["panels"][0]["role"] == "predicted"


def test_a_panel_stored_before_display_scaling_shows_its_full_range(app):
    from app.views.presenters import _panel

    old = {"title": "t", "kind": "heatmap", "signed": True, "target": None,
           "value_range": [-2.0, 2.0], "metrics": {}, "notes": [], "overlay": "o.png",
           "heatmap": "h.png", "array": "a.npy"}
    with app.test_request_context():
        display = _panel("k" * 64, old)["display"]
    assert display["scale"] == "full" and display["range"] == [-2.0, 2.0]
    assert display["description"] == "full range: ± the largest |value|"


def test_running_job_page_has_progress_bars_and_cancel(make_app):
    import threading

    app = make_app()
    client = app.test_client()
    executor = app.extensions["convscope"].executor
    gate = threading.Event()
    original = executor._start
    executor._start = lambda job: (gate.wait(10), original(job))[-1]
    image = upload(client, (png_bytes(seed=3), "photo.png"))[0]["id"]
    job_id = client.post("/api/v1/jobs", json={"images": [image], "visualizations": [
        {"name": "saliency"}, {"name": "grad_cam"}]}).json["id"]
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'data-finished="false"' in html and 'id="job-progress"' in html
    assert len(re.findall(r'<progress class="item-progress"', html)) == 2
    assert 'id="cancel-button"' in html
    assert '<noscript><meta http-equiv="refresh"' in html
    gate.set()
    wait_job(client, job_id)


def test_hostile_filename_is_escaped_everywhere(client):
    image = upload(client, (png_bytes(seed=9), HOSTILE_NAME))[0]
    assert image["filename"] == HOSTILE_NAME               # stored as given: it is only text
    job = run_job(client, [image["id"]])
    html = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "<img src=x" not in html


def test_models_page_shows_details_and_load_errors(client):
    html = client.get("/models").get_data(as_text=True)
    detail = next(m for m in client.get("/api/v1/models").json["models"] if m["ok"])
    full = client.get(f"/api/v1/models/{detail['id']}").json
    assert full["sha256"] in html
    assert "CAM layers" in html and full["default_cam_layer"] in html
    assert f"{full['parameters']:,}" in html
    assert "32×32 px" in html
    assert "broken.pt" in html and "E_CHECKPOINT" in html


def test_error_pages_are_html_for_browsers_and_json_for_api_clients(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert b"E_NOT_FOUND" in response.data
    response = client.get("/nope", headers={"Accept": "application/json"})
    assert response.status_code == 404 and response.json["error"]["code"] == "E_NOT_FOUND"
    response = client.get("/jobs/" + "a" * 32)
    assert response.status_code == 404 and b"E_NOT_FOUND" in response.data
    response = client.put("/api/v1/health")
    assert response.status_code == 405
    assert response.json["error"]["code"] == "E_METHOD_NOT_ALLOWED"
    assert "GET" in response.headers["Allow"]


def test_unexpected_errors_are_500_without_a_traceback(make_app):
    app = make_app(wait=False)

    def broken():
        raise RuntimeError("/secret/path/model.pt exploded")

    app.add_url_rule("/api/v1/broken", "broken", broken)
    app.add_url_rule("/broken", "broken_page", broken)
    client = app.test_client()
    wait_ready(client)
    response = client.get("/api/v1/broken")
    assert response.status_code == 500
    assert response.json == {"error": {"code": "E_INTERNAL",
                                       "message": "An internal error occurred."}}
    page = client.get("/broken")
    assert page.status_code == 500 and b"E_INTERNAL" in page.data
    assert b"secret" not in page.data and b"Traceback" not in page.data


def test_legend_css_and_static_assets(client):
    css = client.get("/legend.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    assert ".legend-bar.signed" in css.get_data(as_text=True)
    for asset in ("/static/css/convscope.css", "/static/js/workbench.js", "/static/js/job.js",
                  "/static/js/maps.js", "/static/js/results.js"):
        assert client.get(asset).status_code == 200, asset


def test_a_method_requested_twice_is_told_apart_by_its_parameters(client):
    image = upload(client, (png_bytes(seed=13), "one.png"))[0]["id"]
    job = run_job(client, [image], [{"name": "saliency"},
                                    {"name": "saliency", "params": {"smoothgrad_samples": 4}}])
    grid = between(client.get(f"/jobs/{job['id']}").get_data(as_text=True),
                   '<table class="results-grid', "</thead>")
    heads = re.findall(r'title="Compare [^"]*">([^<]+)</a></th>', grid)
    assert heads == ["Saliency (gradients)", "Saliency (gradients) · smoothgrad samples 4"]
