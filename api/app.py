"""The Flask application factory."""

from __future__ import annotations

import time
import uuid

import structlog
from flask import Flask, g, request
from redis import Redis

from api import dashboard, errors, health, jobs
from api.services import Services
from shared.connection import connect
from shared.settings import Settings

log = structlog.get_logger()

REQUEST_ID_HEADER = "X-Request-ID"


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the API app from `settings` (read from the environment when not given)."""
    settings = settings or Settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["gptoss"] = Services(
        settings=settings, redis=redis or connect(settings.redis_url_or_default())
    )
    errors.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    dashboard.init_app(app)
    app.before_request(_bind_request)
    app.after_request(_finish_request)
    return app


def _bind_request() -> None:
    structlog.contextvars.clear_contextvars()
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
    g.started = time.perf_counter()
    structlog.contextvars.bind_contextvars(request_id=g.request_id)


def _finish_request(response):  # type: ignore[no-untyped-def]
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    if request.path not in ("/healthz", "/readyz"):
        log.info(
            "request_handled",
            method=request.method,
            path=request.path,
            status=response.status_code,
            duration_ms=round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
        )
    return response
