"""Authentication: bearer token for the API, login page + session cookie for browsers."""
from __future__ import annotations

import io
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from app import auth
from tests.security.conftest import TOKEN, assert_html_error, assert_json_error, bearer
from tests.web.conftest import csrf_from, png_bytes, wait_job


@pytest.fixture
def auth_app(make_app):
    app = make_app(auth_token=TOKEN, wait=False)
    app.extensions[auth.EXTENSION].failure_delay_s = 0     # keep the suite fast
    return app


@pytest.fixture
def anonymous(auth_app):
    return auth_app.test_client()


def login(client, token: str = TOKEN, next_url: str = "/"):
    page = client.get(f"/login?next={next_url}")
    assert page.status_code == 200
    return client.post("/login", data={"csrf_token": csrf_from(page.data), "token": token,
                                       "next": next_url})


@pytest.fixture
def browser(auth_app):
    client = auth_app.test_client()
    response = login(client)
    assert response.status_code == 303
    return client


def test_auth_is_off_by_default(client):
    assert client.get("/api/v1/models").status_code == 200
    assert client.get("/").status_code == 200
    assert client.get("/login").status_code == 404


# --- API: bearer token ------------------------------------------------------------------------

API_ROUTES = [("GET", "/api/v1/models"), ("GET", "/api/v1/visualizations"),
              ("GET", "/api/v1/jobs/" + "0" * 32), ("DELETE", "/api/v1/jobs/" + "0" * 32),
              ("POST", "/api/v1/jobs"), ("POST", "/api/v1/images"),
              ("GET", "/api/v1/images/" + "0" * 64),
              ("GET", "/api/v1/results/" + "0" * 64 + "/result.json"),
              ("GET", "/api/v1/no-such-route")]


@pytest.mark.parametrize("method, path", API_ROUTES)
@pytest.mark.parametrize("headers, bearer_error", [
    ({}, None),
    (bearer("wrong-token-wrong-token"), "invalid_token"),
    (bearer(TOKEN + "x"), "invalid_token"),
    (bearer(TOKEN[:-1]), "invalid_token"),
    ({"Authorization": f"Basic {TOKEN}"}, "invalid_request"),
    ({"Authorization": "Bearer"}, "invalid_request"),
    ({"Authorization": "Bearer \u00e9\u00e9\u00e9"}, "invalid_token"),
])
def test_api_needs_the_right_bearer_token(anonymous, method, path, headers, bearer_error):
    response = anonymous.open(path, method=method, headers=headers)
    assert_json_error(response, 401, "E_UNAUTHORIZED")
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer")
    if bearer_error:
        assert f'error="{bearer_error}"' in challenge


def test_api_works_with_the_right_token(anonymous):
    assert anonymous.get("/api/v1/models", headers=bearer()).status_code == 200
    assert anonymous.get("/api/v1/models",
                         headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200
    data = {"image": (io.BytesIO(png_bytes(seed=3)), "a.png")}
    response = anonymous.post("/api/v1/images", data=data, content_type="multipart/form-data",
                              headers=bearer())
    assert response.status_code == 201
    image = response.json["images"][0]["id"]
    response = anonymous.post("/api/v1/jobs", headers=bearer(), json={
        "model": "latest", "images": [image], "visualizations": [{"name": "grad_cam"}]})
    assert response.status_code == 202
    job = wait_job(_AuthedClient(anonymous), response.json["id"])
    assert job["status"] == "done"
    # The token also opens pages (handy for curl).
    assert anonymous.get("/models", headers=bearer()).status_code == 200


class _AuthedClient:
    """``wait_job`` polls with ``client.get``: add the bearer header to it."""

    def __init__(self, client):
        self.client = client

    def get(self, path, **kwargs):
        return self.client.get(path, headers=bearer(), **kwargs)


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/ready", "/static/css/convscope.css",
                                  "/static/js/workbench.js", "/legend.css", "/login"])
def test_health_ready_static_and_login_stay_open(auth_app, anonymous, path):
    from tests.web.conftest import wait_ready

    wait_ready(anonymous)
    response = anonymous.get(path)
    assert response.status_code == 200, path
    if path.startswith("/static"):
        response.close()


def test_tokens_are_compared_in_constant_time(anonymous, monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert anonymous.get("/api/v1/models", headers=bearer("x" * 40)).status_code == 401
    assert anonymous.get("/api/v1/models", headers=bearer()).status_code == 200
    # Both comparisons went through compare_digest, on equal-length digests (no length leak).
    token_calls = [(a, b) for a, b in calls if len(a) == 32]
    assert len(token_calls) >= 2 and all(len(a) == len(b) for a, b in token_calls)
    assert TOKEN.encode() not in b"".join(a + b for a, b in calls)


def test_wrong_tokens_are_slowed_then_limited_per_address(auth_app, anonymous):
    state = auth_app.extensions[auth.EXTENSION]
    for _ in range(state.limiter.max_failures):
        assert anonymous.get("/api/v1/models", headers=bearer("w" * 20)).status_code == 401
    response = anonymous.get("/api/v1/models", headers=bearer("w" * 20))
    error = assert_json_error(response, 429, "E_TOO_MANY_REQUESTS")
    assert 1 <= int(response.headers["Retry-After"]) <= 60 and "try again" in error["message"]
    # Even the right token waits: guessing must not go on from this address.
    assert anonymous.get("/api/v1/models", headers=bearer()).status_code == 429
    # Another address is not affected.
    other = anonymous.get("/api/v1/models", headers=bearer(),
                          environ_overrides={"REMOTE_ADDR": "10.1.2.3"})
    assert other.status_code == 200
    # The login form is limited too.
    page = anonymous.get("/login")
    response = anonymous.post("/login", data={"csrf_token": csrf_from(page.data),
                                              "token": TOKEN})
    assert_html_error(response, 429, "E_TOO_MANY_REQUESTS")


def test_failed_attempts_wait_a_little(make_app):
    import time

    app = make_app(auth_token=TOKEN, wait=False)
    client = app.test_client()
    started = time.monotonic()
    assert client.get("/api/v1/models", headers=bearer("w" * 20)).status_code == 401
    assert time.monotonic() - started >= app.extensions[auth.EXTENSION].failure_delay_s > 0


def test_limiter_forgets_addresses_when_full():
    limiter = auth.FailureLimiter(max_failures=2, window_s=60, max_addresses=5)
    for number in range(50):
        limiter.record_failure(f"10.0.0.{number}")
    assert len(limiter._failures) <= 5
    limiter.record_failure("10.0.0.49")
    assert limiter.retry_after("10.0.0.49") > 0 and limiter.retry_after("10.0.0.48") == 0


# --- browsers: login page and session cookie --------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/models", "/jobs/" + "0" * 32, "/nope"])
def test_pages_redirect_to_login_and_come_back(anonymous, path):
    response = anonymous.get(path + "?model=x")
    assert response.status_code == 303
    location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query)["next"] == [path + "?model=x"]
    page = anonymous.get(response.headers["Location"])
    assert page.status_code == 200 and b'type="password"' in page.data
    assert f'name="next" value="{path}?model=x"'.encode() in page.data


def test_json_clients_of_pages_get_401_not_a_redirect(anonymous):
    response = anonymous.get("/models", headers={"Accept": "application/json"})
    assert_json_error(response, 401, "E_UNAUTHORIZED")
    response = anonymous.post("/", data={})
    assert response.status_code in (401, 403)


def test_login_flow_sets_a_hardened_session_cookie(auth_app):
    client = auth_app.test_client()
    response = login(client, next_url="/models")
    assert response.status_code == 303 and response.headers["Location"] == "/models"
    cookie_header = response.headers["Set-Cookie"]
    assert cookie_header.startswith("convscope_session=")
    assert "HttpOnly" in cookie_header and "SameSite=Lax" in cookie_header
    assert "Expires=" in cookie_header          # lasts CONVSCOPE_SESSION_HOURS
    assert "Secure" not in cookie_header        # plain HTTP on localhost unless asked
    assert TOKEN not in cookie_header           # the cookie proves the login, never holds it
    assert client.get("/models").status_code == 200
    assert client.get("/api/v1/models").status_code == 200
    # Signed in: the page offers a sign-out form; the login page sends you on.
    assert b'action="/logout"' in client.get("/").data
    assert client.get("/login?next=/models").headers["Location"] == "/models"


def test_secure_cookie_flag_when_configured(make_app):
    app = make_app(auth_token=TOKEN, secure_cookies=True, wait=False)
    client = app.test_client()
    response = login(client)
    assert response.status_code == 303
    assert "Secure" in response.headers["Set-Cookie"]


def test_wrong_token_on_the_login_page(anonymous):
    response = login(anonymous, token="not-the-token-at-all")
    assert_html_error(response, 401, "E_UNAUTHORIZED")
    assert b'type="password"' in response.data
    assert anonymous.get("/models").status_code == 303


def test_login_form_needs_its_csrf_token(anonymous):
    anonymous.get("/login")
    response = anonymous.post("/login", data={"token": TOKEN})
    assert_html_error(response, 403, "E_FORBIDDEN")
    response = anonymous.post("/login", data={"token": TOKEN, "csrf_token": "forged"})
    assert_html_error(response, 403, "E_FORBIDDEN")
    assert anonymous.get("/models").status_code == 303


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example",
                                    "javascript:alert(1)", "evil", "/%0d%0aSet-Cookie:x=1"])
def test_login_never_redirects_off_site(auth_app, target):
    client = auth_app.test_client()
    response = login(client, next_url=target)
    assert response.status_code == 303
    location = response.headers["Location"]
    assert location.startswith("/") and not location.startswith("//") and "\\" not in location
    assert "\r" not in location and "\n" not in location


def test_logout_ends_the_session(browser):
    page = browser.get("/")
    response = browser.post("/logout", data={"csrf_token": csrf_from(page.data)})
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert browser.get("/models").status_code == 303
    assert browser.get("/api/v1/models").status_code == 401


def test_logout_needs_the_csrf_token(browser):
    assert browser.post("/logout").status_code == 403
    assert browser.get("/models").status_code == 200


def test_session_api_calls_that_change_state_need_the_csrf_header(browser):
    """The session cookie is ambient: a state change it authenticates must prove it comes from
    our page (X-CSRF-Token), as the workbench script does."""
    token = csrf_from(browser.get("/").data)
    data = {"image": (io.BytesIO(png_bytes(seed=4)), "a.png")}
    response = browser.post("/api/v1/images", data=data, content_type="multipart/form-data")
    assert_json_error(response, 403, "E_FORBIDDEN")
    data = {"image": (io.BytesIO(png_bytes(seed=4)), "a.png")}
    response = browser.post("/api/v1/images", data=data, content_type="multipart/form-data",
                            headers={"X-CSRF-Token": "forged"})
    assert_json_error(response, 403, "E_FORBIDDEN")
    data = {"image": (io.BytesIO(png_bytes(seed=4)), "a.png")}
    response = browser.post("/api/v1/images", data=data, content_type="multipart/form-data",
                            headers={"X-CSRF-Token": token})
    assert response.status_code == 201
    image = response.json["images"][0]["id"]
    body = {"images": [image], "visualizations": [{"name": "grad_cam"}]}
    assert browser.post("/api/v1/jobs", json=body).status_code == 403
    response = browser.post("/api/v1/jobs", json=body, headers={"X-CSRF-Token": token})
    assert response.status_code == 202
    assert browser.delete(f"/api/v1/jobs/{response.json['id']}").status_code == 403


def test_workbench_script_sends_the_csrf_header():
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "static/js/workbench.js").read_text()
    assert "X-CSRF-Token" in script
    assert len(re.findall(r"csrfHeaders", script)) >= 3      # defined, and used in both POSTs


def test_changing_the_token_signs_everyone_out(make_app, tmp_path):
    first = make_app(auth_token=TOKEN, secret_key="k" * 32, wait=False)
    client = first.test_client()
    assert login(client).status_code == 303
    cookie = client.get_cookie("convscope_session").value
    same = make_app(auth_token=TOKEN, secret_key="k" * 32, wait=False).test_client()
    same.set_cookie("convscope_session", cookie)
    assert same.get("/models").status_code == 200           # another worker, same settings
    rotated = make_app(auth_token=TOKEN + "-rotated", secret_key="k" * 32,
                       wait=False).test_client()
    rotated.set_cookie("convscope_session", cookie)
    assert rotated.get("/models").status_code == 303


def test_token_from_a_file(make_app, tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    app = make_app(auth_token_file=secret, wait=False)
    client = app.test_client()
    assert client.get("/api/v1/models").status_code == 401
    assert client.get("/api/v1/models", headers=bearer()).status_code == 200
