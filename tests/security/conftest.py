"""Fixtures for the security tests: the web tests' tiny-model apps (``make_app``, ``app``,
``client``) plus helpers for authenticated clients and leak checks."""
from __future__ import annotations

import re

import pytest

from tests.web.conftest import app, checkpoint_dir, client, make_app  # noqa: F401 (fixtures)
from tests.web.conftest import png_bytes, upload

TOKEN = "s3cret-team-token-0123456789"

# What an error response must never contain: tracebacks and server paths.
LEAK_PATTERNS = [re.compile(pattern) for pattern in (
    r"Traceback", r"/work/", r"/root/", r"/home/", r"/tmp/", r"site-packages",
    r"File \"", r"\.py\b", r"Werkzeug Debugger")]


def assert_no_leak(body: bytes | str) -> None:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    for pattern in LEAK_PATTERNS:
        assert not pattern.search(text), f"response leaks {pattern.pattern!r}: {text[:300]}"


def assert_json_error(response, status: int, code: str | None = None) -> dict:
    """A JSON error response: the status, {"error": {"code", "message"}}, no leaks."""
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.mimetype == "application/json", response.mimetype
    error = response.json["error"]
    assert set(error) <= {"code", "message", "fields"}
    assert isinstance(error["code"], str) and error["code"].startswith("E_")
    assert isinstance(error["message"], str) and error["message"].strip()
    if code is not None:
        assert error["code"] == code, error
    assert_no_leak(response.data)
    return error


def assert_html_error(response, status: int, code: str | None = None) -> None:
    """An HTML error page: the status, the stable code in the page, no leaks."""
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.mimetype == "text/html", response.mimetype
    assert b"E_" in response.data
    if code is not None:
        assert code.encode() in response.data, response.data[:500]
    assert_no_leak(response.data)


@pytest.fixture
def image_id(client) -> str:
    return upload(client, (png_bytes(seed=7), "photo.png"))[0]["id"]


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
