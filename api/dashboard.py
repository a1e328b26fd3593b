"""rq-dashboard at `/admin/rq`: behind the admin key, read-only unless GPTOSS_RQ_DASHBOARD_WRITABLE.

rq-dashboard has no authentication of its own when mounted as a blueprint, so every request under
the prefix (pages, JSON polls, static files) passes `guard` first. A browser cannot
send a Bearer header, so HTTP Basic with the admin key as the password (any user name) is accepted
too, and a refusal carries a Basic challenge so the browser asks for it.
"""

from __future__ import annotations

import base64
import binascii
import hmac

import rq_dashboard
import rq_dashboard.web
from flask import Flask, request
from redis import Redis
from rq import Worker
from rq.job import Job, requeue_job

from api.auth import check_admin
from api.services import services
from shared import sentinel
from shared.errors import AdminDisabled, DashboardReadOnly, Unauthorized
from shared.jobstore.rqstore import SERIALIZER

PREFIX = "/admin/rq"
"""Where the dashboard is mounted."""

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods a read-only dashboard still answers."""

WRITING_ENDPOINTS = frozenset({"rq_dashboard.requeue_all"})
"""Endpoints that change jobs even on GET (rq-dashboard's "requeue all" accepts GET)."""

POLL_INTERVAL_MS = 5000
"""How often the dashboard's pages poll their JSON (rq-dashboard's default is 2.5 s)."""


def init_app(app: Flask) -> None:
    """Mount rq-dashboard on the app's Redis, with the project's JSON serializer, behind `guard`."""
    settings = app.extensions["gptoss"].settings
    use_json_serializer()
    url = settings.redis_url_or_default()
    if sentinel.is_sentinel_url(url):  # rq-dashboard reads the Sentinels' password from its config
        app.config["RQ_DASHBOARD_REDIS_SENTINEL_PASSWORD"] = sentinel.parse(url).sentinel_password
        url = sentinel.without_sentinel_password(url)
    app.config["RQ_DASHBOARD_REDIS_URL"] = url
    app.config["RQ_DASHBOARD_POLL_INTERVAL"] = POLL_INTERVAL_MS
    # Hides the delete and empty buttons; `guard` refuses the writes themselves.
    app.config["RQ_DASHBOARD_DISABLE_DELETE"] = not settings.rq_dashboard_writable
    rq_dashboard.web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=PREFIX)
    # First of the blueprint's hooks: after the app's own (request id, trace), before rq-dashboard's,
    # which opens a Redis connection. Static files and every page and poll pass through it.
    app.before_request_funcs.setdefault(rq_dashboard.blueprint.name, []).insert(0, guard)


class JsonWorker(Worker):
    """RQ's Worker, listed with the project's serializer so a busy worker's current job can be read."""

    @classmethod
    def all(cls, connection=None, job_class=None, queue_class=None, queue=None, serializer=None):  # type: ignore[no-untyped-def]
        return Worker.all(connection, job_class, queue_class, queue, serializer or SERIALIZER)


def requeue_json_job(job_id: str, connection: Redis) -> Job:
    """RQ's requeue_job with the project's serializer, so a requeued job's meta stays JSON."""
    return requeue_job(job_id, connection=connection, serializer=SERIALIZER)


def use_json_serializer() -> None:
    """Make rq-dashboard 0.9 read and requeue jobs with the project's JSON serializer.

    Its `config.serializer` covers most views, but the workers list (`Worker.all`) and requeueing
    (`requeue_job`) ignore it and would unpickle JSON: the workers page fails whenever a worker is
    busy. Both names are looked up in its module at call time, so pointing them at JSON-aware
    versions fixes every view. rq-dashboard is pinned below 0.10 for this.
    """
    rq_dashboard.web.config.serializer = SERIALIZER
    rq_dashboard.web.Worker = JsonWorker  # type: ignore[misc]
    rq_dashboard.web.requeue_job = requeue_json_job


def guard() -> None:
    """Refuse a dashboard request without the admin key, and any write while read-only."""
    key = services().settings.admin_key
    if key is not None and not key.get_secret_value():
        # An empty key would match an empty password: treat it as no key at all.
        raise AdminDisabled("Admin endpoints are off: GPTOSS_ADMIN_KEY is empty.")
    try:
        check_admin()
    except Unauthorized as refusal:
        if not _basic_key_matches():
            refusal.headers = {"WWW-Authenticate": 'Basic realm="gptoss-admin", charset="UTF-8"'}
            raise
    if services().settings.rq_dashboard_writable:
        return
    if request.method not in READ_METHODS or request.endpoint in WRITING_ENDPOINTS:
        raise DashboardReadOnly(
            "rq-dashboard is read-only: set GPTOSS_RQ_DASHBOARD_WRITABLE=true to requeue, delete or empty."
        )


def _basic_key_matches() -> bool:
    """The request carries `Authorization: Basic` whose password is the admin key."""
    key = services().settings.admin_key
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if key is None or scheme.lower() != "basic":
        return False
    try:
        _, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(password.encode(), key.get_secret_value().encode())
