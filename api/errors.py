"""The API's one error boundary: every failure becomes a JSON error with a stable code."""

from __future__ import annotations

import structlog
from flask import Flask, jsonify
from redis.exceptions import RedisError
from werkzeug import exceptions as http
from werkzeug.exceptions import HTTPException

from shared.errors import (
    ClientClosedRequest,
    GptossError,
    InvalidJson,
    MethodNotAllowed,
    RequestTooLarge,
    RouteNotFound,
    ServiceUnavailable,
)
from shared.jobstore.events import ClientGone

log = structlog.get_logger()

REDIS_RETRY_AFTER = "5"
"""Seconds a client should wait before retrying while Redis is unreachable."""


def init_app(app: Flask) -> None:
    """Register the handlers that turn exceptions into JSON answers."""
    app.register_error_handler(GptossError, _domain_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RedisError, _redis_error)
    app.register_error_handler(ClientGone, _client_gone)
    app.register_error_handler(Exception, _unexpected_error)


def _domain_error(exc: GptossError):  # type: ignore[no-untyped-def]
    response = jsonify(exc.to_dict())
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
    by_status: dict[int | None, GptossError] = {
        400: InvalidJson("The request body could not be read."),
        404: RouteNotFound("No such endpoint."),
        405: MethodNotAllowed("This endpoint does not accept that method."),
        413: RequestTooLarge("The request body is over the size limit."),
    }
    error = by_status.get(exc.code)
    if isinstance(exc, http.MethodNotAllowed) and exc.valid_methods:
        allowed = ", ".join(sorted(exc.valid_methods))  # RFC 9110: a 405 must say what is allowed
        error = MethodNotAllowed(f"This endpoint accepts only {allowed}.", headers={"Allow": allowed})
    if error is None:
        error = GptossError(exc.description or "HTTP error")
        error.status, error.code = exc.code or 500, f"http_{exc.code}"
    return _domain_error(error)


def _redis_error(exc: RedisError):  # type: ignore[no-untyped-def]
    log.warning("redis_unavailable", error=str(exc))
    error = ServiceUnavailable(
        "The job store is unreachable; retry shortly.", headers={"Retry-After": REDIS_RETRY_AFTER}
    )
    return _domain_error(error)


def _client_gone(exc: ClientGone):  # type: ignore[no-untyped-def]
    # The client's own ending, like a cancel: logged at info, without a traceback.
    log.info("client_gone", job_id=str(exc))
    return _domain_error(ClientClosedRequest("The client closed the connection."))


def _unexpected_error(exc: Exception):  # type: ignore[no-untyped-def]
    log.exception("unexpected_error")
    return _domain_error(GptossError("An unexpected error occurred; it has been logged."))
