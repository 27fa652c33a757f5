"""Real servers for the service tests: a production-mode gunicorn with a token (two workers) and
a second gunicorn process sharing its data directory, secret and token, as a second host or a
restarted container would. Started once per test session and shared, because each start loads
the demo model."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import requests

from benchmarks.load import GunicornServer, gunicorn_server

TOKEN = "service-test-token-0123456789abcdef"
SECRET = "service-test-secret-0123456789abcdef"
# The second process's sessions end this many hours after sign-in (about 10 s).
SHORT_SESSION_HOURS = 0.003


@dataclass
class AuthServers:
    main: GunicornServer            # two workers, default session lifetime
    other: GunicornServer           # same data dir, secret and token; short absolute lifetime


@pytest.fixture(scope="session")
def auth_servers(tmp_path_factory) -> AuthServers:
    data_dir = tmp_path_factory.mktemp("shared") / "data"
    data_dir.mkdir()
    common = {"CONVSCOPE_ENV": "production", "CONVSCOPE_SECRET_KEY": SECRET,
              "CONVSCOPE_AUTH_TOKEN": TOKEN}
    with gunicorn_server({**common, "CONVSCOPE_WORKERS": "2"}, data_dir=data_dir) as main, \
            gunicorn_server({**common, "CONVSCOPE_SESSION_MAX_HOURS": str(SHORT_SESSION_HOURS)},
                            data_dir=data_dir) as other:
        yield AuthServers(main, other)


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def sign_in(base_url: str) -> requests.Session:
    """A browser-like session signed in through the login form."""
    browser = requests.Session()
    page = browser.get(base_url + "/login", timeout=10)
    assert page.status_code == 200, page.text[:300]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = browser.post(base_url + "/login", timeout=10, allow_redirects=False,
                            data={"csrf_token": csrf, "token": TOKEN, "next": "/"})
    assert response.status_code == 303, response.text[:300]
    assert is_signed_in(browser, base_url)
    return browser


def is_signed_in(browser: requests.Session, base_url: str) -> bool:
    """Whether the session's cookie authenticates an API call (401 when it does not)."""
    response = browser.get(base_url + "/api/v1/models", timeout=10)
    assert response.status_code in (200, 401), response.text[:300]
    return response.status_code == 200


def csrf_of(browser: requests.Session, base_url: str) -> str:
    page = browser.get(base_url + "/", timeout=10)
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
