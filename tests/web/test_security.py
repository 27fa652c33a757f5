"""Browser protections: CSP without inline code, nosniff, CSRF, cross-site refusal, no CORS."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from tests.web.conftest import csrf_from, png_bytes, run_job, upload

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def test_pages_send_a_strict_content_security_policy_and_nosniff(client):
    for path in ("/", "/models", "/nope"):
        response = client.get(path)
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "object-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "Access-Control-Allow-Origin" not in response.headers


def test_api_sends_no_cors_headers_even_when_asked(client):
    response = client.get("/api/v1/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
    response = client.options("/api/v1/jobs", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("template", sorted(p.relative_to(TEMPLATES).as_posix()
                                            for p in TEMPLATES.rglob("*.html")
                                            if p.name != "report.html"))
def test_templates_have_no_inline_scripts_styles_or_handlers(template):
    text = (TEMPLATES / template).read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), "inline <script>"
    assert "<style" not in text and not re.search(r"\sstyle=", text)
    assert not re.search(r"\son[a-z]+\s*=", text), "inline event handler"
    assert "javascript:" not in text.lower()
    assert "|safe" not in text, "autoescaping must not be switched off"
    assert "http://" not in text and "//cdn" not in text


def test_cross_site_state_changes_are_refused(client):
    data = {"image": (io.BytesIO(png_bytes(seed=1)), "a.png")}
    response = client.post("/api/v1/images", data=data, content_type="multipart/form-data",
                           headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403 and response.json["error"]["code"] == "E_FORBIDDEN"
    response = client.post("/api/v1/jobs", json={}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    response = client.delete("/api/v1/jobs/" + "0" * 32, headers={"Sec-Fetch-Site": "same-site"})
    assert response.status_code == 403
    # Same-origin browser requests and non-browser clients are fine.
    data = {"image": (io.BytesIO(png_bytes(seed=1)), "a.png")}
    response = client.post("/api/v1/images", data=data, content_type="multipart/form-data",
                           headers={"Sec-Fetch-Site": "same-origin",
                                    "Origin": "http://localhost"})
    assert response.status_code == 201


def test_form_posts_need_the_session_csrf_token(client):
    image = upload(client, (png_bytes(seed=2), "a.png"))[0]["id"]
    job = run_job(client, [image])
    response = client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 403 and b"E_FORBIDDEN" in response.data
    response = client.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": "forged"})
    assert response.status_code == 403
    token = csrf_from(client.get("/").data)
    assert client.post(f"/jobs/{job['id']}/cancel",
                       data={"csrf_token": token}).status_code == 303
    # Another browser session's token is useless here.
    other = client.application.test_client()
    assert other.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": token}).status_code == 403


def test_session_cookie_is_httponly_and_samesite(client):
    client.get("/")
    cookie = client.get_cookie("convscope_session")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Lax"


def test_result_and_image_files_are_never_documents(client):
    image = upload(client, (png_bytes(seed=2), "<script>.html"))[0]
    job = run_job(client, [image["id"]])
    panel = job["results"][0]["visualizations"][0]["panels"][0]
    for url in (f"/api/v1/images/{image['id']}", panel["overlay_url"], panel["array_url"],
                panel["json_url"]):
        response = client.get(url)
        assert response.mimetype != "text/html"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in response.headers["Content-Security-Policy"]
