"""Browser-facing protections applied to every response and every state-changing request.

- Cross-site requests that change state are refused (``Sec-Fetch-Site``, or ``Origin`` for
  browsers that do not send it); clients without either header (curl, scripts) are not browsers
  and are unaffected. ``POST /api/v1/jobs`` additionally needs a JSON body, which a cross-site
  form cannot send, and no CORS headers are ever set.
- HTML form posts also carry a per-session CSRF token (synchronizer token in the signed
  session cookie), compared in constant time.
- Every response gets a Content-Security-Policy without inline scripts or styles,
  ``X-Content-Type-Options: nosniff``, no framing and a same-origin referrer policy.
"""
from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, request, session

from app.errors import Forbidden

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
CSRF_FIELD = "csrf_token"
_CSRF_SESSION_KEY = "csrf"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
# Files we serve (images, arrays, JSON) are never documents: sandboxed even if opened directly.
FILE_CONTENT_SECURITY_POLICY = "default-src 'none'; img-src 'self'; sandbox"


def csrf_token() -> str:
    """This session's CSRF token (created on first use); put it in every form."""
    token = session.get(_CSRF_SESSION_KEY)
    if not token:
        token = secrets.token_urlsafe(32)
        session[_CSRF_SESSION_KEY] = token
    return token


def _cross_site() -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if not origin:
        return False
    return origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()


def check_request() -> None:
    if request.method in SAFE_METHODS:
        return
    if _cross_site():
        raise Forbidden("Requests from other sites are not allowed.")
    if request.path.startswith("/api/"):
        return
    expected = session.get(_CSRF_SESSION_KEY, "")
    sent = request.form.get(CSRF_FIELD, "")
    if not expected or not sent or not hmac.compare_digest(str(sent), str(expected)):
        raise Forbidden("This form has expired or did not come from this site; reload the page "
                        "and try again.", fields={CSRF_FIELD: "the token from the page's form"})


def add_security_headers(response: Response) -> Response:
    headers = response.headers
    is_document = response.mimetype in ("text/html", "application/xhtml+xml")
    headers.setdefault("Content-Security-Policy",
                       CONTENT_SECURITY_POLICY if is_document else FILE_CONTENT_SECURITY_POLICY)
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "same-origin"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    if is_document:
        headers.setdefault("Cache-Control", "no-store")
    return response


def init_app(app: Flask, settings: Any) -> None:
    app.before_request(check_request)
    app.after_request(add_security_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["csrf_field"] = CSRF_FIELD
