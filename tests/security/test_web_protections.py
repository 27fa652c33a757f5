"""Browser protections, table-driven: allowed hosts, no CORS, CSP without inline code, nosniff,
CSRF on every state-changing form post, uploads never served as HTML, autoescaping of class
names and file names."""
from __future__ import annotations

import io
from html.parser import HTMLParser

import pytest

from tests.security.conftest import (TOKEN, assert_html_error, assert_json_error, assert_no_leak,
                                     bearer)
from tests.web.conftest import (csrf_from, png_bytes, run_job, submit, upload, wait_job,
                                write_checkpoint_dir)

# --- allowed hosts (DNS rebinding) ------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [
    ("localhost", True), ("localhost:8000", True), ("LOCALHOST.", True),
    ("127.0.0.1", True), ("127.0.0.1:5000", True), ("[::1]:8000", True), ("[::1]", True),
    ("10.0.0.7:8000", True), ("0.0.0.0:8000", True),        # IP literals cannot be rebound
    ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False),
    ("127.0.0.1.nip.io", False), ("convscope.team.example", False), ("", False),
    ("local host", False), ("localhost@evil.example", False),
])
def test_default_allowed_hosts(client, host, allowed):
    response = client.get("/api/v1/health", headers={"Host": host})
    if allowed:
        assert response.status_code == 200, host
    else:
        assert_json_error(response, 400, "E_BAD_HOST")


@pytest.mark.parametrize("setting, host, allowed", [
    ("convscope.team.example", "convscope.team.example", True),
    ("convscope.team.example", "convscope.team.example:443", True),
    ("convscope.team.example", "other.team.example", False),
    ("convscope.team.example", "localhost", False),          # the list replaces the default
    ("convscope.team.example", "127.0.0.1:8000", True),
    (".team.example", "a.team.example", True), (".team.example", "team.example", True),
    (".team.example", "evilteam.example", False),
    ("a.example, B.Example ", "b.example", True),
    ("*", "anything.example", True),
])
def test_configured_allowed_hosts(make_app, setting, host, allowed):
    client = make_app(allowed_hosts=setting, wait=False).test_client()
    response = client.get("/api/v1/health", headers={"Host": host})
    assert response.status_code == (200 if allowed else 400), (setting, host)


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/models"),
                                          ("POST", "/api/v1/images"), ("GET", "/api/v1/models"),
                                          ("GET", "/static/css/convscope.css")])
def test_bad_host_is_refused_everywhere_before_anything_else(client, method, path):
    response = client.open(path, method=method, headers={"Host": "rebind.evil.example",
                                                         "Accept": "text/html"})
    assert response.status_code == 400
    if path.startswith("/api/"):
        assert_json_error(response, 400, "E_BAD_HOST")
    else:
        assert_html_error(response, 400, "E_BAD_HOST")


def test_bad_host_is_checked_before_authentication(make_app):
    client = make_app(auth_token=TOKEN, wait=False).test_client()
    response = client.get("/api/v1/models", headers={"Host": "evil.example", **bearer()})
    assert_json_error(response, 400, "E_BAD_HOST")


# --- no CORS ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/health"), ("GET", "/api/v1/models"), ("OPTIONS", "/api/v1/jobs"),
    ("OPTIONS", "/api/v1/images"), ("GET", "/"), ("OPTIONS", "/"),
    ("GET", "/api/v1/visualizations"),
])
def test_no_cors_headers_for_any_origin(client, method, path):
    response = client.open(path, method=method, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "X-CSRF-Token, Authorization"})
    assert not [name for name in response.headers.keys()
                if name.lower().startswith("access-control-")]


# --- CSP, nosniff, no inline code in rendered pages -------------------------------------------

class _InlineCodeFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_inline_script = False

    def handle_starttag(self, tag, attrs):
        names = {name.lower() for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style>")
        for name, value in attrs:
            if name.lower().startswith("on"):
                self.problems.append(f"handler {name}")
            if name.lower() == "style":
                self.problems.append("style attribute")
            if value and value.strip().lower().startswith("javascript:"):
                self.problems.append(f"javascript: URL in {name}")


def _check_document(response) -> None:
    policy = response.headers["Content-Security-Policy"]
    directives = dict((part.strip().split(" ", 1) + [""])[:2] for part in policy.split(";"))
    assert directives["script-src"] == "'self'" and directives["object-src"] == "'none'"
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert directives["frame-ancestors"] == "'none'"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    finder = _InlineCodeFinder()
    finder.feed(response.get_data(as_text=True))
    assert not finder.problems, finder.problems


def test_every_page_has_the_policy_and_no_inline_code(make_app):
    client = make_app(auth_token=TOKEN, wait=False).test_client()
    assert client.get("/", headers=bearer()).status_code == 200
    image = upload_with_bearer(client)
    job = client.post("/api/v1/jobs", headers=bearer(), json={
        "images": [image], "visualizations": [{"name": "grad_cam"}]}).json
    pages = ["/", "/models", f"/jobs/{job['id']}", "/jobs/" + "0" * 32, "/no-such-page"]
    for path in pages:
        _check_document(client.get(path, headers=bearer()))
    _check_document(client.get("/login"))
    _check_document(client.get("/", headers={"Host": "evil.example"}))       # 400 page


def upload_with_bearer(client) -> str:
    response = client.post("/api/v1/images", headers=bearer(),
                           data={"image": (io.BytesIO(png_bytes(seed=5)), "a.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 201
    return response.json["images"][0]["id"]


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/models", "/models", "/legend.css",
                                  "/api/v1/nope", "/static/js/job.js"])
def test_nosniff_on_every_response(client, path):
    response = client.get(path)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" in response.headers
    response.close()


# --- CSRF on every state-changing form post ---------------------------------------------------

def _form_post_routes(app) -> list[str]:
    """Every non-API URL rule that accepts a state-changing method."""
    rules = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(("/api/", "/static/")):
            continue
        if rule.methods & {"POST", "PUT", "PATCH", "DELETE"}:
            rules.append(rule.rule)
    return sorted(rules)


# Every form route (dataset mode's too); each is posted below without a valid token.
FORM_ROUTES = ["/", "/datasets", "/evaluations/<job_id>/cancel", "/evaluations/<job_id>/explain",
               "/jobs/<job_id>/cancel", "/login", "/logout", "/sanity", "/sanity/<job_id>/cancel",
               "/timelines", "/timelines/<job_id>/cancel", "/timelines/<job_id>/explain",
               "/timelines/<job_id>/extend"]


def test_the_form_routes_are_the_ones_this_test_knows(make_app):
    app = make_app(auth_token=TOKEN, wait=False)
    # A new form route must be added to the CSRF table below.
    assert _form_post_routes(app) == FORM_ROUTES


@pytest.mark.parametrize("rule", FORM_ROUTES)
def test_every_form_post_needs_the_session_csrf_token(make_app, rule):
    app = make_app(auth_token=TOKEN)
    victim = app.test_client()
    page = victim.get("/login")
    victim.post("/login", data={"csrf_token": csrf_from(page.data), "token": TOKEN})
    image = upload_with_bearer(victim)
    job = victim.post("/api/v1/jobs", headers=bearer(), json={
        "images": [image], "visualizations": [{"name": "grad_cam"}]}).json
    path = rule.replace("<job_id>", job["id"])
    attacker = app.test_client()
    foreign_token = csrf_from(attacker.get("/login").data)
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "forged"},
                 {"csrf_token": foreign_token}, {"csrf_token": "\u00e9" * 43}):
        response = victim.post(path, data={**data, "token": TOKEN, "method": "grad_cam"})
        assert_html_error(response, 403, "E_FORBIDDEN")
    # A cross-site post is refused even with the right token.
    own_token = csrf_from(victim.get("/").data)
    response = victim.post(path, data={"csrf_token": own_token, "token": TOKEN},
                           headers={"Sec-Fetch-Site": "cross-site"})
    assert_html_error(response, 403, "E_FORBIDDEN")
    # The victim is still signed in and the job was not cancelled by any of the above.
    assert victim.get("/models").status_code == 200
    assert victim.get(f"/api/v1/jobs/{job['id']}").json["status"] != "cancelled"


def test_a_form_post_with_the_right_token_works(client):
    image = upload(client, (png_bytes(seed=9), "a.png"))[0]["id"]
    job = run_job(client, [image])
    token = csrf_from(client.get("/").data)
    assert client.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": token}).status_code == 303


# --- uploads are never served as HTML ---------------------------------------------------------

HTML_BODIES = [b"<!doctype html><html><script>alert(1)</script></html>",
               b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>",
               b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script>",
               b"GIF89a<script>alert(1)</script>"]


@pytest.mark.parametrize("body", HTML_BODIES)
@pytest.mark.parametrize("name", ["a.png", "a.html", "a.svg", "a.jpg"])
def test_html_disguised_as_an_image_is_refused(client, body, name):
    response = client.post("/api/v1/images", data={"image": (io.BytesIO(body), name)},
                           content_type="multipart/form-data")
    error = assert_json_error(response, response.status_code)
    assert response.status_code in (400, 415) and error["code"] in (
        "E_IMAGE_UNSUPPORTED", "E_IMAGE_CORRUPT")


def test_stored_images_and_results_are_served_as_images_or_downloads(client):
    image = upload(client, (png_bytes(seed=2), "<b>x</b>.html"))[0]
    response = client.get(f"/api/v1/images/{image['id']}")
    assert response.mimetype == "image/png" and response.data.startswith(b"\x89PNG")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response.headers["Content-Security-Policy"]
    assert ".html" not in response.headers.get("Content-Disposition", "")
    job = run_job(client, [image["id"]])
    panel = job["results"][0]["visualizations"][0]["panels"][0]
    for url in (panel["overlay_url"], panel["heatmap_url"], panel["array_url"],
                panel["json_url"]):
        response = client.get(url)
        assert response.mimetype in ("image/png", "application/octet-stream",
                                     "application/json"), url
        if not response.mimetype.startswith("image/"):
            assert response.headers["Content-Disposition"].startswith("attachment")
        assert "sandbox" in response.headers["Content-Security-Policy"]


# --- autoescaping of user data ----------------------------------------------------------------

HOSTILE_CLASSES = ['<script>alert("c")</script>', "<img src=x onerror=alert(1)>",
                   '"><svg onload=alert(2)>', "dog & 'cat'"]
HOSTILE_FILENAME = "<img src=x onerror=alert(3)>.png"


def test_class_names_and_file_names_are_escaped_everywhere(make_app, tmp_path):
    directory = write_checkpoint_dir(tmp_path / "hostile")
    (directory / "labels.txt").write_text("\n".join(HOSTILE_CLASSES) + "\n")
    client = make_app(directory=directory).test_client()
    image = upload(client, (png_bytes(seed=3), HOSTILE_FILENAME))[0]["id"]
    response = submit(client, [image], [{"name": "grad_cam"}],
                      targets=[0, 1, 2], true_labels={image: HOSTILE_CLASSES[3]})
    assert response.status_code == 202, response.json
    job = wait_job(client, response.json["id"])
    assert job["status"] == "done"
    views = [f"/jobs/{job['id']}/views/{view}" for view in ("detail-0-0", "compare-image-0")]
    for path in ("/", f"/jobs/{job['id']}", "/models", *views):
        html = client.get(path).get_data(as_text=True)
        for raw in ("<script>alert", "<img src=x", "<svg onload"):
            assert raw not in html, (path, raw)
    job_page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert "&lt;img src=x onerror=alert(3)&gt;.png" in job_page
    assert "&lt;script&gt;alert(&#34;c&#34;)&lt;/script&gt;" in job_page
    assert "dog &amp; &#39;cat&#39;" in job_page
    detail = client.get(views[0]).get_data(as_text=True)      # every target's panel title
    for escaped in ("&lt;script&gt;alert(&#34;c&#34;)&lt;/script&gt;",
                    "&lt;img src=x onerror=alert(1)&gt;", "&#34;&gt;&lt;svg onload=alert(2)&gt;"):
        assert escaped in detail, escaped
    workbench = client.get("/").get_data(as_text=True)
    assert 'value="&#34;&gt;&lt;svg onload=alert(2)&gt;"' in workbench
    # The JSON twin has the raw text (JSON is not HTML; the page scripts use textContent).
    assert job["results"][0]["filename"] == HOSTILE_FILENAME


def test_error_messages_echoing_user_input_are_escaped(client):
    response = client.get("/?model=<script>alert(9)</script>")
    assert response.status_code == 404
    assert b"<script>alert(9)" not in response.data
    response = client.get("/api/v1/models/<script>", headers={"Accept": "text/html"})
    assert b"<script>" not in response.data or response.mimetype == "application/json"
    assert_no_leak(response.data)


def test_hostile_form_fields_come_back_escaped(client):
    token = csrf_from(client.get("/").data)
    response = client.post("/", data={"csrf_token": token, "true_label": "<script>x</script>",
                                      "target_class": '"><img src=x onerror=alert(4)>',
                                      "image": (io.BytesIO(png_bytes(seed=1)), "a.png"),
                                      "method": "grad_cam", "target_mode": "class"},
                           content_type="multipart/form-data")
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "<script>x" not in html and "<img src=x" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html

