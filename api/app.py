"""The Flask application factory."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from flask import Flask, Response, current_app, g, request
from redis import Redis

from api import active, admin, completions, dashboard, errors, events, health, jobs, metrics, openapi
from api.active import ActiveRequests
from api.arrival import ArrivalMiddleware
from api.batches import bp as batches_bp
from api.files import bp as files_bp
from api.ratelimit import TenantLimits
from api.responses import bp as responses_bp
from api.services import Services, services
from api.streams import StreamSlots
from api.tenancy import authenticate_request
from shared.connection import close_budget, connect, open_budget
from shared.jobstore.hub import StreamHub
from shared.settings import Settings
from shared.tracing import FORCE_TRACE_HEADER, current_ids, exemplar, forced

log = structlog.get_logger()

REQUEST_ID_HEADER = "X-Request-ID"
TRACE_ID_HEADER = "X-Trace-ID"
REDIS_CONNECTIONS = 32
"""Connections of each of the API process's two Redis clients, shared by all its requests."""
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")
"""Probes and scrapes: neither logged nor traced."""


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the API app from `settings` (read from the environment when not given)."""
    settings = settings or Settings()
    redis = redis or connect(
        settings.redis_url_or_default(), budgeted=True, shared=REDIS_CONNECTIONS, acks=settings.redis_acks()
    )
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if settings.observability:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        # First, so the request span is open when our own hooks log.
        FlaskInstrumentor().instrument_app(app, excluded_urls=",".join(p.strip("/") for p in QUIET_PATHS))
    stream_redis = connect(settings.redis_url_or_default(), shared=REDIS_CONNECTIONS)
    app.extensions["gptoss"] = Services(
        settings=settings,
        redis=redis,
        metrics=metrics.api_metrics(settings),
        limits=TenantLimits(settings, redis),
        stream_redis=stream_redis,
        hub=StreamHub(stream_redis),
        streams=StreamSlots(settings.api_streams_per_tenant),
        active=ActiveRequests(settings.api_active_requests),
    )
    errors.init_app(app)
    active.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(completions.bp)
    app.register_blueprint(responses_bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(files_bp)
    app.register_blueprint(batches_bp)
    dashboard.init_app(app)
    metrics.start_at_zero(app)
    app.before_request(_open_redis_budget)
    app.before_request(_bind_request)
    app.before_request(authenticate_request)
    app.after_request(_close_redis_budget)  # registered first, so it runs last
    app.after_request(_finish_request)
    # Outer, so the sampler sees the request's wish before the request span starts.
    app.wsgi_app = ForceTraceMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    # Outermost: the arrival time, before anything reads the request (TTFT counts from it).
    app.wsgi_app = ArrivalMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


class ForceTraceMiddleware:
    """Marks a request carrying `X-Force-Trace` so its trace is sampled whatever the ratio."""

    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        wish = environ.get("HTTP_" + FORCE_TRACE_HEADER.upper().replace("-", "_"), "")
        with forced(wish not in ("", "0")):
            return self._app(environ, start_response)


def _open_redis_budget() -> None:
    """Bound the request's waits on Redis, all its commands together (authentication included)."""
    open_budget(services().settings.api_redis_budget)


def _close_redis_budget(response: Response) -> Response:
    """The response is built: the budget ends here, so a streamed body (SSE) is not cut by it."""
    close_budget()
    return response


def _bind_request() -> None:
    structlog.contextvars.clear_contextvars()
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
    g.started = time.perf_counter()
    structlog.contextvars.bind_contextvars(request_id=g.request_id)
    if request.path not in QUIET_PATHS:
        log.info("request_received", method=request.method, path=request.path)


def _finish_request(response: Response) -> Response:
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    route = request.url_rule.rule if request.url_rule else "unmatched"
    if current_app.extensions["gptoss"].settings.observability:
        api = services().metrics
        api.http_requests.labels(request.method, route, str(response.status_code)).inc()
        api.http_duration.labels(request.method, route).observe(elapsed, exemplar=exemplar())
    if trace_id := current_ids().get("trace_id"):
        response.headers[TRACE_ID_HEADER] = trace_id
    if request.path not in QUIET_PATHS:
        log.info(
            "request_handled",
            method=request.method,
            route=route,
            status=response.status_code,
            duration_ms=round(elapsed * 1000, 2),
        )
    return response
