"""The API's one error boundary: every failure becomes a JSON error with a stable code."""

from __future__ import annotations

import structlog
from flask import Flask, jsonify
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from shared.errors import (
    GptossError,
    InvalidJson,
    MethodNotAllowed,
    RequestTooLarge,
    RouteNotFound,
    ServiceUnavailable,
)

log = structlog.get_logger()

REDIS_RETRY_AFTER = "5"
"""Seconds a client should wait before retrying while Redis is unreachable."""


def init_app(app: Flask) -> None:
    """Register the handlers that turn exceptions into JSON answers."""
    app.register_error_handler(GptossError, _domain_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RedisError, _redis_error)
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


def _unexpected_error(exc: Exception):  # type: ignore[no-untyped-def]
    log.exception("unexpected_error")
    return _domain_error(GptossError("An unexpected error occurred; it has been logged."))
