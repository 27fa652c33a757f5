"""Every error response: JSON ``{"error": {"code", "message"}}`` on API paths (and for clients
that ask for JSON), an HTML page elsewhere; never a traceback or a server path."""
from __future__ import annotations

import io

import pytest

from tests.security.conftest import TOKEN, assert_html_error, assert_json_error, assert_no_leak
from tests.web.conftest import png_bytes

BIG = b"x" * (70 * 1024 * 1024)

# (method, path, request options, status, code)
API_ERRORS = [
    ("GET", "/api/v1/nope", {}, 404, "E_NOT_FOUND"),
    ("PUT", "/api/v1/jobs", {}, 405, "E_METHOD_NOT_ALLOWED"),
    ("POST", "/api/v1/health", {}, 405, "E_METHOD_NOT_ALLOWED"),
    ("GET", "/api/v1/jobs/" + "0" * 32, {}, 404, "E_NOT_FOUND"),
    ("GET", "/api/v1/images/" + "0" * 64, {}, 404, "E_NOT_FOUND"),
    ("GET", "/api/v1/models/nope", {}, 404, "E_UNKNOWN_MODEL"),
    ("POST", "/api/v1/jobs", {"data": "{broken", "content_type": "application/json"}, 400,
     "E_BAD_REQUEST"),
    ("POST", "/api/v1/jobs", {"data": "model=x"}, 415, "E_UNSUPPORTED_MEDIA_TYPE"),
    ("POST", "/api/v1/jobs", {"json": "just a string"}, 400, "E_BAD_REQUEST"),
    ("POST", "/api/v1/images", {"data": {}}, 400, "E_BAD_REQUEST"),
    ("POST", "/api/v1/images", {"data": {"image": (io.BytesIO(b""), "a.png")}}, 400,
     "E_IMAGE_EMPTY"),
    ("POST", "/api/v1/images", {"data": {"image": (io.BytesIO(b"<html>"), "a.png")}}, 415,
     "E_IMAGE_UNSUPPORTED"),
    ("POST", "/api/v1/images", {"data": {"image": (io.BytesIO(png_bytes()[:60]), "a.png")}},
     400, "E_IMAGE_CORRUPT"),
    ("POST", "/api/v1/images", {"data": BIG, "content_type": "application/octet-stream"}, 413,
     "E_PAYLOAD_TOO_LARGE"),
    ("GET", "/api/v1/health", {"headers": {"Host": "evil.example"}}, 400, "E_BAD_HOST"),
    ("POST", "/api/v1/images", {"headers": {"Sec-Fetch-Site": "cross-site"}}, 403,
     "E_FORBIDDEN"),
]


@pytest.mark.parametrize("method, path, options, status, code", API_ERRORS,
                         ids=[f"{m} {p[:40]} {c}" for m, p, _, _, c in API_ERRORS])
def test_api_errors_are_json_without_leaks(client, method, path, options, status, code):
    options = dict(options)
    if isinstance(options.get("data"), dict):
        options = {**options, "data": {k: (io.BytesIO(v[0].getvalue()), v[1])
                                       for k, v in options["data"].items()},
                   "content_type": "multipart/form-data"}
    response = client.open(path, method=method, **options)
    assert_json_error(response, status, code)


PAGE_ERRORS = [
    ("GET", "/nope", {}, 404, "E_NOT_FOUND"),
    ("GET", "/jobs/" + "0" * 32, {}, 404, "E_NOT_FOUND"),
    ("GET", "/jobs/../../etc/passwd", {}, 404, "E_NOT_FOUND"),
    ("GET", "/?model=nope", {}, 404, "E_UNKNOWN_MODEL"),
    ("DELETE", "/", {}, 403, "E_FORBIDDEN"),          # CSRF is checked before routing
    ("POST", "/", {}, 403, "E_FORBIDDEN"),
    ("POST", "/jobs/" + "0" * 32 + "/cancel", {}, 403, "E_FORBIDDEN"),
    ("GET", "/", {"headers": {"Host": "evil.example"}}, 400, "E_BAD_HOST"),
    ("POST", "/", {"data": BIG, "content_type": "application/octet-stream"}, 413,
     "E_PAYLOAD_TOO_LARGE"),
]


@pytest.mark.parametrize("method, path, options, status, code", PAGE_ERRORS,
                         ids=[f"{m} {p[:40]} {c}" for m, p, _, _, c in PAGE_ERRORS])
def test_page_errors_are_html_without_leaks(client, method, path, options, status, code):
    headers = {"Accept": "text/html,application/xhtml+xml", **options.pop("headers", {})}
    response = client.open(path, method=method, headers=headers, **options)
    assert_html_error(response, status, code)


def test_clients_asking_for_json_get_json_from_pages(client):
    response = client.get("/nope", headers={"Accept": "application/json"})
    assert_json_error(response, 404, "E_NOT_FOUND")


SECRET_MESSAGE = "boom in /work/main/app/secret.py at /root/.cache, site-packages/x"


@pytest.mark.parametrize("path, as_json", [("/api/v1/models", True), ("/models", False),
                                           ("/", False), ("/api/v1/visualizations", True)])
def test_unexpected_exceptions_become_500_without_details(client, monkeypatch, caplog, path,
                                                          as_json):
    catalog = client.application.extensions["convscope"].catalog

    def explode(*args, **kwargs):
        raise RuntimeError(SECRET_MESSAGE)

    monkeypatch.setattr(catalog, "entries", explode)
    monkeypatch.setattr(catalog, "get", explode)
    response = client.get(path + "?model=x" if "visualizations" in path else path)
    if as_json:
        assert_json_error(response, 500, "E_INTERNAL")
    else:
        assert_html_error(response, 500, "E_INTERNAL")
    assert b"boom" not in response.data and b"RuntimeError" not in response.data
    assert "boom" in caplog.text      # the operator still finds it in the log


def test_errors_with_authentication_on_leak_nothing(make_app):
    client = make_app(auth_token=TOKEN, wait=False).test_client()
    for path in ("/api/v1/models", "/api/v1/jobs/" + "0" * 32, "/api/v1/nope"):
        response = client.get(path)
        assert_json_error(response, 401, "E_UNAUTHORIZED")
        assert TOKEN.encode() not in response.data
    response = client.post("/login", data={"token": "x"})
    assert_html_error(response, 403, "E_FORBIDDEN")
    assert_no_leak(client.get("/login").data)
