"""Browser sessions on real gunicorn in production mode (issue 13, item 4).

Signing out used to clear only the browser's copy: the saved cookie, replayed, still got 200,
and being re-signed on every request it lived for ever. Now signing out revokes the session
for every process sharing the data directory, and every session has an absolute lifetime.
"""
from __future__ import annotations

import time

import pytest
import requests

from tests.service.conftest import (SHORT_SESSION_HOURS, csrf_of, is_signed_in, sign_in)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _replay(cookie: str, base_url: str) -> requests.Session:
    thief = requests.Session()
    thief.cookies.set("convscope_session", cookie)
    return thief


@pytest.mark.parametrize("replay_on", ["main", "other"],
                         ids=["same-server", "another-process-sharing-the-data-dir"])
def test_a_cookie_saved_before_sign_out_is_dead_after_it(auth_servers, replay_on):
    main = auth_servers.main.base_url
    browser = sign_in(main)
    saved = browser.cookies.get("convscope_session")
    replay_url = getattr(auth_servers, replay_on).base_url
    assert is_signed_in(_replay(saved, main), replay_url)        # the copy works until...
    response = browser.post(main + "/logout", data={"csrf_token": csrf_of(browser, main)},
                            allow_redirects=False, timeout=10)
    assert response.status_code == 303
    # ...sign-out, on every worker and every process that shares the data directory.
    for _ in range(6):                                           # fresh connections: both workers
        thief = _replay(saved, main)
        assert not is_signed_in(thief, replay_url)
        page = thief.get(replay_url + "/", allow_redirects=False, timeout=10)
        assert page.status_code == 303 and "/login" in page.headers["Location"]


def test_other_sessions_survive_one_sign_out(auth_servers):
    main = auth_servers.main.base_url
    staying, leaving = sign_in(main), sign_in(main)
    leaving.post(main + "/logout", data={"csrf_token": csrf_of(leaving, main)}, timeout=10)
    assert is_signed_in(staying, main) and not is_signed_in(leaving, main)


def test_an_active_session_still_ends_at_its_absolute_lifetime(auth_servers):
    """Requests every second keep re-signing the cookie; it still ends on time."""
    other = auth_servers.other.base_url
    lifetime = SHORT_SESSION_HOURS * 3600
    browser = sign_in(other)
    signed_in_at = time.monotonic()
    ended_after = None
    while time.monotonic() - signed_in_at < lifetime + 10:
        if not is_signed_in(browser, other):
            ended_after = time.monotonic() - signed_in_at
            break
        time.sleep(1.0)
    assert ended_after is not None, "the session outlived its absolute lifetime"
    assert lifetime - 2 <= ended_after <= lifetime + 3, ended_after
    assert not is_signed_in(browser, other)
