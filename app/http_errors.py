"""The one place that turns errors into HTTP responses, HTML or JSON.

``ConvscopeError`` -> its status and ``{"error": {"code", "message", "fields"?}}``; werkzeug's
HTTP errors (404 routing, 405, 413 body too large, ...) -> the same shape with a stable code;
anything else -> 500 ``E_INTERNAL``, logged here with its traceback and never shown to the user.
API paths (``/api/``) and clients that prefer JSON get JSON; browsers get an HTML page.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from app.errors import ConvscopeError, Internal

log = logging.getLogger(__name__)

# Stable codes for errors raised by werkzeug/Flask itself rather than by our code.
HTTP_ERROR_CODES: dict[int, tuple[str, str]] = {
    400: ("E_BAD_REQUEST", "The request is malformed."),
    401: ("E_UNAUTHORIZED", "Authentication is required."),
    403: ("E_FORBIDDEN", "This request is not allowed."),
    404: ("E_NOT_FOUND", "Not found."),
    405: ("E_METHOD_NOT_ALLOWED", "This address does not accept that HTTP method."),
    406: ("E_NOT_ACCEPTABLE", "The requested response format is not available."),
    408: ("E_REQUEST_TIMEOUT", "The request took too long to arrive."),
    413: ("E_PAYLOAD_TOO_LARGE", "The request body is too large."),
    414: ("E_URI_TOO_LONG", "The address is too long."),
    415: ("E_UNSUPPORTED_MEDIA_TYPE", "The request's content type is not supported."),
    429: ("E_TOO_MANY_REQUESTS", "Too many requests; try again shortly."),
    431: ("E_HEADERS_TOO_LARGE", "The request headers are too large."),
    503: ("E_UNAVAILABLE", "The service is not available right now."),
}


def wants_json() -> bool:
    """API routes always answer JSON; elsewhere, a client that asks for JSON first gets it."""
    if request.path.startswith("/api/"):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > \
        request.accept_mimetypes["text/html"]


def error_response(error: ConvscopeError, status: int | None = None) -> Response:
    status = status or error.http_status
    body: dict[str, Any] = {"error": error.to_dict()}
    if wants_json():
        response = jsonify(body)
    else:
        response = Response(render_template("errors/error.html", error=error, status=status),
                            mimetype="text/html")
    response.status_code = status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def coded_error(code: str, status: int, message: str, *,
                headers: dict[str, str] | None = None) -> ConvscopeError:
    """An error with a stable code that has no class of its own (HTTP-level conditions such as
    "not ready" or "send JSON"); raise it like any ConvscopeError."""
    error = ConvscopeError(message, headers=headers)
    error.code = code
    error.http_status = status
    return error


def _from_http_exception(exc: HTTPException) -> ConvscopeError:
    status = exc.code or 500
    code, message = HTTP_ERROR_CODES.get(status, ("E_HTTP_%d" % status, "The request failed."))
    return coded_error(code, status, message)


def handle_convscope_error(error: ConvscopeError) -> Response:
    if error.http_status >= 500 and error.http_status != 503:   # 503: busy or not ready
        log.warning("%s on %s %s: %s", error.code, request.method, request.path, error.message)
    return error_response(error)


def handle_http_exception(exc: HTTPException) -> Response:
    response = error_response(_from_http_exception(exc))
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def handle_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(Internal())


def init_app(app: Flask, settings: Any) -> None:
    app.register_error_handler(ConvscopeError, handle_convscope_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
