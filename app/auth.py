"""Optional authentication for a team service: one shared token.

Off unless ``CONVSCOPE_AUTH_TOKEN`` (or ``CONVSCOPE_AUTH_TOKEN_FILE``) is set. Then:

- API clients send ``Authorization: Bearer <token>``; without it, or with a wrong one, they get
  401 ``E_UNAUTHORIZED`` with ``WWW-Authenticate: Bearer``.
- Browsers are redirected to ``/login``, a form (with the page's CSRF token) that takes the
  same token and sets the signed session cookie (``HttpOnly``, ``SameSite=Lax``, ``Secure``
  when ``CONVSCOPE_SECURE_COOKIES`` is set; it lasts ``CONVSCOPE_SESSION_HOURS`` after the last
  request). The cookie then authenticates the pages and their own API calls. A cookie is sent
  by the browser on its own, so a state-changing API call authenticated by it must also carry
  the session's CSRF token in the ``X-CSRF-Token`` header (the workbench script sends it):
  another site cannot set that header without a CORS preflight, which is never granted.
- Open without a token: health and readiness, static files, the legend stylesheet, the
  bundled public-domain sample images (``/samples/<name>``), and the login page itself.
- Tokens are compared in constant time (``hmac.compare_digest`` over SHA-256 digests, so
  the length does not leak either). The session holds an HMAC of the token, never the token,
  so changing the token signs every browser out.
- Sessions end: ``CONVSCOPE_SESSION_HOURS`` after the last request (the cookie's signature is
  dated), ``CONVSCOPE_SESSION_MAX_HOURS`` after the sign-in however active (the sign-in time
  is inside the signed cookie, so re-signing it never extends it), and at once on sign-out:
  each session has a random id, and signing out records it as revoked in the data directory
  (``sessions/revoked/``), which every gunicorn worker and server process sharing
  ``CONVSCOPE_DATA_DIR`` checks. A saved cookie replayed after sign-out is not signed in.
- Brute force: each wrong token costs a short delay, and an address with too many recent
  failures is refused with 429 for a while (per server process; behind a proxy the address is
  the proxy's, so a flood locks out token guessing for everyone rather than letting it on).
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (Blueprint, Flask, Response, current_app, g, redirect, render_template,
                   request, session, url_for)

from app.errors import Forbidden, Unauthorized
from app.http_errors import coded_error, wants_json
from app.views import security

log = logging.getLogger(__name__)

EXTENSION = "convscope_auth"
SESSION_KEY = "auth"
SESSION_ID_KEY = "sid"
SESSION_SINCE_KEY = "since"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_FIELD = "token"
NEXT_FIELD = "next"
# Reachable without a token: probes, assets, and the way in.
OPEN_ENDPOINTS = frozenset({"api.health", "api.ready", "static", "pages.legend_css",
                            "samples.sample", "auth.login", "auth.submit_login",
                            "auth.logout"})

auth = Blueprint("auth", __name__)


def tokens_match(sent: str, expected: str) -> bool:
    """Constant-time comparison that does not leak the expected token's length."""
    sent_digest = hashlib.sha256(sent.encode("utf-8")).digest()
    expected_digest = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(sent_digest, expected_digest)


class FailureLimiter:
    """At most ``max_failures`` wrong tokens per address in any ``window_s`` seconds."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0,
                 max_addresses: int = 10_000) -> None:
        self.max_failures, self.window_s, self.max_addresses = max_failures, window_s, max_addresses
        self._failures: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int:
        """Seconds until ``address`` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(address)
            if failures is None or len(failures) < self.max_failures:
                return 0
            wait = self.window_s - (now - failures[0])
        return max(0, math.ceil(wait))

    def record_failure(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            failures = self._failures.pop(address, None)
            if failures is None:
                failures = collections.deque(maxlen=self.max_failures)
                if len(self._failures) >= self.max_addresses:
                    self._forget_oldest(now)
            failures.append(now)
            self._failures[address] = failures     # re-inserted: dict order = last failure

    def _forget_oldest(self, now: float) -> None:
        stale = [address for address, failures in self._failures.items()
                 if now - failures[-1] > self.window_s]
        for address in stale or list(self._failures)[: max(1, self.max_addresses // 10)]:
            del self._failures[address]

    def reset(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22,64}")


class SessionRevocations:
    """Session ids that signed out, one empty file each under ``root``, shared by every process
    that uses the same data directory. Entries older than the sessions' absolute lifetime are
    removed as new ones arrive (those sessions have ended anyway)."""

    def __init__(self, root: Path, max_age_s: float) -> None:
        self.root, self.max_age_s = root, max_age_s

    def revoke(self, session_id: str) -> None:
        if not _SESSION_ID.fullmatch(session_id):
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / session_id).touch()
        except OSError as error:
            # Not recorded: the session still ends in this browser (its cookie is cleared).
            log.warning("could not record a sign-out (%s); the session ends at its lifetime",
                        error.strerror)
            return
        self._forget_expired()

    def is_revoked(self, session_id: str) -> bool:
        return not _SESSION_ID.fullmatch(session_id) or (self.root / session_id).exists()

    def _forget_expired(self) -> None:
        cutoff = time.time() - self.max_age_s - 3600
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    try:
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                    except OSError:
                        pass
        except OSError:
            pass


class AuthState:
    """Per-app authentication state in ``app.extensions[EXTENSION]``."""

    def __init__(self, token: str, secret_key: str, *, revocations: SessionRevocations,
                 session_max_s: float) -> None:
        self.token = token
        self.revocations = revocations
        self.session_max_s = session_max_s
        # What a signed-in session holds: bound to this token and this secret key.
        self.session_proof = hmac.new(secret_key.encode("utf-8"),
                                      b"convscope-login\0" + token.encode("utf-8"),
                                      hashlib.sha256).hexdigest()
        self.limiter = FailureLimiter()
        self.failure_delay_s = 0.25


def _state() -> AuthState:
    return current_app.extensions[EXTENSION]


def _client_address() -> str:
    return request.remote_addr or "unknown"


def _unauthorized(message: str = "Authentication is required; send 'Authorization: Bearer "
                  "<token>' or sign in.", *, bearer_error: str | None = None) -> Unauthorized:
    challenge = 'Bearer realm="convscope"'
    if bearer_error:
        challenge += f', error="{bearer_error}"'
    return Unauthorized(message, headers={"WWW-Authenticate": challenge})


def _too_many_attempts(retry_after: int) -> Exception:
    return coded_error("E_TOO_MANY_REQUESTS", 429,
                       "Too many wrong tokens from this address; try again in a minute.",
                       headers={"Retry-After": str(max(1, retry_after))})


def _refuse_if_limited() -> None:
    retry_after = _state().limiter.retry_after(_client_address())
    if retry_after:
        raise _too_many_attempts(retry_after)


def _failed_attempt() -> None:
    state = _state()
    state.limiter.record_failure(_client_address())
    if state.failure_delay_s:
        time.sleep(state.failure_delay_s)


def signed_in() -> bool:
    """Whether this browser session has logged in with the current token, within its absolute
    lifetime, and has not signed out (on any worker)."""
    state = _state()
    proof, session_id, since = (session.get(SESSION_KEY), session.get(SESSION_ID_KEY),
                                session.get(SESSION_SINCE_KEY))
    if not (isinstance(proof, str) and isinstance(session_id, str)
            and isinstance(since, (int, float)) and not isinstance(since, bool)):
        return False
    if not hmac.compare_digest(proof.encode("utf-8"), state.session_proof.encode()):
        return False
    age = time.time() - since
    if not -60 <= age < state.session_max_s:
        return False
    return not state.revocations.is_revoked(session_id)


def _bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer`` header; None when there is no header."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise _unauthorized("Send the token as 'Authorization: Bearer <token>'.",
                            bearer_error="invalid_request")
    return credentials.strip()


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server only (no open redirect)."""
    if not target or not isinstance(target, str) or len(target) > 2000:
        return url_for("pages.workbench")
    parts = urlsplit(target)
    if (parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//")
            or "\\" in target or any(ord(char) < 32 for char in target)):
        return url_for("pages.workbench")
    return target


def check_authentication() -> Response | None:
    """``before_request``: a valid bearer token or a signed-in session, else 401 (or, for a
    browser asking for a page, a redirect to the login page)."""
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    token = _bearer_token()
    if token is not None:
        _refuse_if_limited()
        if tokens_match(token, _state().token):
            g.convscope_auth = "bearer"
            return None
        _failed_attempt()
        raise _unauthorized("The token is not valid.", bearer_error="invalid_token")
    if signed_in():
        if request.method not in security.SAFE_METHODS and request.path.startswith("/api/") \
                and not security.csrf_token_matches(request.headers.get(CSRF_HEADER)):
            raise Forbidden(f"Requests signed in with the session cookie need the page's CSRF "
                            f"token in the {CSRF_HEADER} header; reload the page and try again.",
                            fields={CSRF_HEADER: "the csrf_token of the page's form"})
        g.convscope_auth = "session"
        return None
    if request.method in ("GET", "HEAD") and not wants_json():
        return redirect(url_for("auth.login", **{NEXT_FIELD: request.full_path.rstrip("?")}),
                        code=303)
    raise _unauthorized()


def _render_login(error: Any = None, status: int = 200) -> tuple[str, int, dict[str, str]]:
    html = render_template("pages/login.html", error=error,
                           next_url=safe_next(request.values.get(NEXT_FIELD)))
    headers = dict(getattr(error, "headers", {}) or {})
    return html, status, headers


@auth.get("/login")
def login() -> Any:
    if signed_in():
        return redirect(safe_next(request.args.get(NEXT_FIELD)), code=303)
    return _render_login()


@auth.post("/login")
def submit_login() -> Any:
    """The form's CSRF token was checked by app.views.security before this runs."""
    try:
        _refuse_if_limited()
    except Exception as error:  # noqa: BLE001 -- the 429 error, shown on the form
        return _render_login(error, 429)
    sent = request.form.get(TOKEN_FIELD, "")
    if not isinstance(sent, str) or not tokens_match(sent.strip(), _state().token):
        _failed_attempt()
        return _render_login(_unauthorized("The token is not valid."), 401)
    _state().limiter.reset(_client_address())
    session.clear()                 # a fresh session: new CSRF token, nothing from before
    session.permanent = True        # expires CONVSCOPE_SESSION_HOURS after the last request
    session[SESSION_KEY] = _state().session_proof
    session[SESSION_ID_KEY] = secrets.token_urlsafe(24)
    session[SESSION_SINCE_KEY] = int(time.time())   # ends CONVSCOPE_SESSION_MAX_HOURS later
    return redirect(safe_next(request.form.get(NEXT_FIELD)), code=303)


@auth.post("/logout")
def logout() -> Response:
    """Sign out: the session id is revoked for every process, then the cookie is cleared."""
    session_id = session.get(SESSION_ID_KEY)
    if isinstance(session_id, str):
        _state().revocations.revoke(session_id)
    session.clear()
    return redirect(url_for("auth.login"), code=303)


def init_app(app: Flask, settings: Any) -> None:
    """Register the login routes and the check when a token is configured."""
    app.jinja_env.globals["auth_enabled"] = settings.auth_enabled
    if not settings.auth_enabled:
        return
    max_age_s = settings.session_max_hours * 3600
    revocations = SessionRevocations(Path(settings.data_dir) / "sessions" / "revoked", max_age_s)
    app.extensions[EXTENSION] = AuthState(settings.auth_token, settings.secret_key,
                                          revocations=revocations, session_max_s=max_age_s)
    app.jinja_env.globals["signed_in"] = signed_in
    app.register_blueprint(auth)
    app.before_request(check_authentication)
