"""Sample images: the bundled demo photos listed, served from a table built at start (never a
path from the URL), shown on the workbench, and, in Chromium, added to the upload list and run
like a file the user picked."""
from __future__ import annotations

import io
import re

import pytest

from app import auth
from app.views import samples as samples_module
from app.views.samples import SAMPLE_TITLES, build_sample_table
from tests.browser import CAT_CLASSES, ROOT, page_problems, running_server
from tests.security.conftest import TOKEN, assert_html_error, assert_json_error, bearer
from tests.security.test_paths import HOSTILE_IDS
from tests.web.conftest import png_bytes, run_job

DEMO_IMAGES = ROOT / "demo" / "images"
BUNDLED = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "grace_hopper.jpg"]


def test_the_api_lists_the_bundled_photos_in_order(client):
    response = client.get("/api/v1/samples")
    assert response.status_code == 200
    listed = response.json["samples"]
    assert [sample["name"] for sample in listed] == BUNDLED
    assert all(set(sample) == {"name", "url", "title"} for sample in listed)
    assert [sample["url"] for sample in listed] == [f"/samples/{name}" for name in BUNDLED]
    assert listed[0]["title"] == "Chelsea the cat"
    assert [sample["title"] for sample in listed] == list(SAMPLE_TITLES.values())


@pytest.mark.parametrize("name", BUNDLED)
def test_a_sample_is_served_with_its_type_nosniff_and_cache_headers(client, name):
    response = client.get(f"/samples/{name}")
    assert response.status_code == 200
    assert response.data == (DEMO_IMAGES / name).read_bytes()
    assert response.mimetype == "image/jpeg"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "public, max-age=86400"
    assert "sandbox" in response.headers["Content-Security-Policy"]
    etag = response.headers["ETag"]
    again = client.get(f"/samples/{name}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""


@pytest.mark.parametrize("accept, check", [("application/json", assert_json_error),
                                           ("text/html", assert_html_error)])
def test_unknown_and_hostile_names_give_the_standard_404(client, accept, check):
    for name in ["nope.jpg", "SOURCES.md", "Chelsea.jpg", "chelsea", "chelsea.jpg.", *HOSTILE_IDS,
                 "..%2fdemo.toml", "%2e%2e%2fconvscope.toml", "%2fwork%2fmain%2fsetup.cfg"]:
        response = client.get(f"/samples/{name}", headers={"Accept": accept})
        check(response, 404, "E_NOT_FOUND")
        assert b"[model]" not in response.data and b"root:" not in response.data
        response.close()


def test_samples_are_read_only(client):
    for method in ("POST", "PUT", "DELETE"):
        response = client.open("/samples/chelsea.jpg", method=method)
        # Without the form's CSRF token the security check refuses first (403), else 405.
        assert response.status_code in (403, 405), (method, response.status_code)
        assert not response.data.startswith(b"\xff\xd8")
    head = client.head("/samples/chelsea.jpg")
    assert head.status_code == 200 and head.mimetype == "image/jpeg"


def test_the_table_holds_only_plain_image_files(tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for name in ["cat.png", "b_photo.JPG", "notes.txt", ".hidden.png", "bad name.png",
                 "nested/inner.png", "script.svg", "a.jpeg.html"]:
        (folder / name).write_bytes(png_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (folder / "link.png").symlink_to(outside)
    (folder / "chelsea.jpg").write_bytes(png_bytes())
    table = build_sample_table(folder)
    assert list(table) == ["chelsea.jpg", "b_photo.JPG", "cat.png"]   # known titles first
    assert table["cat.png"].title == "Cat" and table["b_photo.JPG"].title == "B photo"
    assert table["b_photo.JPG"].mimetype == "image/jpeg"
    assert build_sample_table(tmp_path / "missing") == {}


def test_the_workbench_shows_one_button_per_sample(client):
    html = client.get("/").data.decode()
    gallery = html[html.index('class="samples js-only"'):html.index('id="image-list"')]
    assert "Or try a sample image" in gallery
    buttons = re.findall(r'<button type="button" class="sample" data-sample-url="([^"]+)"\s+'
                         r'data-sample-name="([^"]+)"\s+aria-label="Add sample image: ([^"]+)"',
                         gallery)
    assert buttons == [(f"/samples/{name}", name, title)
                       for name, title in zip(BUNDLED, SAMPLE_TITLES.values())]
    assert gallery.count('<img src="/samples/') == len(BUNDLED)


def test_no_gallery_when_there_are_no_samples(make_app, tmp_path, monkeypatch):
    monkeypatch.setattr(samples_module, "sample_directory", lambda: tmp_path / "none")
    client = make_app().test_client()
    assert client.get("/api/v1/samples").json == {"samples": []}
    assert b"Or try a sample image" not in client.get("/").data
    assert client.get("/samples/chelsea.jpg").status_code == 404


def test_a_sample_uploads_and_runs_like_a_picked_file(client):
    data = client.get("/samples/chelsea.jpg").data
    response = client.post("/api/v1/images", data={"image": (io.BytesIO(data), "chelsea.jpg")},
                           content_type="multipart/form-data")
    assert response.status_code == 201, response.json
    image = response.json["images"][0]
    assert image["filename"] == "chelsea.jpg" and (image["width"], image["height"]) == (451, 300)
    assert run_job(client, [image["id"]])["status"] == "done"


def test_with_a_token_the_files_stay_open_and_the_listing_needs_it(make_app):
    app = make_app(auth_token=TOKEN)
    app.extensions[auth.EXTENSION].failure_delay_s = 0
    anonymous = app.test_client()
    response = anonymous.get("/samples/chelsea.jpg")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert_json_error(anonymous.get("/api/v1/samples"), 401, "E_UNAUTHORIZED")
    assert anonymous.get("/api/v1/samples", headers=bearer()).json["samples"][0]["name"] == \
        "chelsea.jpg"
    assert_json_error(anonymous.get("/samples/nope.jpg", headers={"Accept": "application/json"}),
                      404, "E_NOT_FOUND")


@pytest.mark.browser
@pytest.mark.slow
def test_clicking_a_sample_uploads_it_and_runs_in_chromium(chromium, tmp_path):
    with (running_server(tmp_path) as base,
          chromium.new_page(viewport={"width": 1200, "height": 900}) as page):
        problems = page_problems(page)
        page.goto(base + "/")
        page.get_by_role("button", name="Add sample image: Chelsea the cat").click()
        page.wait_for_selector(".thumb[data-image-id]", timeout=10_000)
        assert page.locator(".thumb .filename").all_text_contents() == ["chelsea.jpg"]
        assert page.locator(".thumb .state").text_content() == "ready · 451×300"
        assert page.eval_on_selector(".thumb img", "i => i.complete && i.naturalWidth") > 0
        page.check("input[name=method][value=grad_cam]")
        with page.expect_navigation(url="**/jobs/*"):
            page.click("#run-button")
        page.wait_for_selector("#job[data-finished=true]", timeout=60_000)
        assert page.text_content("#job-status") == "done"
        page.locator("tr.grid-row a.row-link").first.click()
        top1 = page.locator(".view.compare.open .topk tr.top1 .class-index").text_content()
        assert int(top1.strip("() ")) in CAT_CLASSES, top1
    assert problems == [], problems
