"""Browser-facing protections applied to every response and every state-changing request.

- The Host header must name this server (``CONVSCOPE_ALLOWED_HOSTS``; IP addresses always
  pass): a DNS-rebinding page reaches the server under the attacker's host name and gets
  400 ``E_BAD_HOST`` for everything.
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
import ipaddress
import logging
import secrets
import threading
from typing import Any, Iterable
from urllib.parse import urlsplit

from flask import Flask, Response, request, session

from app.errors import BadHost, Forbidden

log = logging.getLogger(__name__)

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


def host_name(host: str) -> str:
    """The name part of a Host header value: no port, no IPv6 brackets, no trailing dot,
    lower case (``"[::1]:8000"`` -> ``"::1"``, ``"Example.COM.:80"`` -> ``"example.com"``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether a Host header value names this server.

    IP literals always pass: a DNS-rebinding attack presents the attacker's *name*, and a page
    that addresses the server by IP is an ordinary cross-origin request (refused below).
    ``allowed`` entries are names, ``.example.com`` (the domain and its subdomains) or ``*``.
    """
    name = host_name(host)
    if not name:
        return False
    if _is_ip_address(name):
        return True
    for entry in allowed:
        entry = host_name(entry) if not entry.startswith(".") else entry.lower().rstrip(".")
        if entry == "*" or entry == name:
            return True
        if entry.startswith(".") and (name == entry[1:] or name.endswith(entry)):
            return True
    return False


class _HostCheck:
    """``before_request``: refuse Host headers not in the settings' allowed hosts."""

    MAX_WARNED = 64     # log each refused name once, up to this many (no log flooding)

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = tuple(allowed)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if host_allowed(request.host, self.allowed):
            return
        name = host_name(request.host)[:80]
        with self._lock:
            first = name not in self._warned and len(self._warned) < self.MAX_WARNED
            self._warned.add(name)
        if first:
            log.warning("Refused a request for host %r; if this server should answer to it, "
                        "add it to CONVSCOPE_ALLOWED_HOSTS.", name)
        raise BadHost("This server does not answer to this host name.")


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


def csrf_token_matches(sent: Any) -> bool:
    """Whether ``sent`` is this session's CSRF token (constant-time comparison)."""
    expected = session.get(_CSRF_SESSION_KEY, "")
    if not expected or not sent or not isinstance(sent, str):
        return False
    return hmac.compare_digest(sent.encode("utf-8"), str(expected).encode("utf-8"))


def check_request() -> None:
    if request.method in SAFE_METHODS:
        return
    if _cross_site():
        raise Forbidden("Requests from other sites are not allowed.")
    if request.path.startswith("/api/"):
        return
    if not csrf_token_matches(request.form.get(CSRF_FIELD, "")):
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
    app.before_request(_HostCheck(settings.allowed_host_names()))     # first: before anything
    app.before_request(check_request)
    app.after_request(add_security_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["csrf_field"] = CSRF_FIELD
