"""`GET /v1/jobs/<id>/events`: a job's events as Server-Sent Events, resumable with Last-Event-ID."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from flask import Blueprint, Response, request, stream_with_context
from redis import Redis

from api.following import follow
from api.jobs import JOB_ID
from api.services import services
from api.tenancy import current_tenant, owned_job
from shared.errors import InvalidEventId, JobNotFound
from shared.jobstore.hub import StreamHub

bp = Blueprint("events", __name__, url_prefix="/v1/jobs")


KEEPALIVE_MS = 5000
"""Milliseconds between keep-alives of an idle stream (also how soon a job that ended without an
event is noticed). Longer than the OpenAI streams' 1 s: this relay cancels nothing when its client
leaves, so it need not notice that soon, and a thousand idle streams wake a fifth as often."""

STREAM_ID = re.compile(r"^[0-9]{1,19}(-[0-9]{1,19})?$")
"""What an event id this stream sent looks like (a Redis stream entry id)."""


@bp.get("/<job_id>/events")
def events(job_id: str) -> Response:
    """Replay the job's events after Last-Event-ID (all of them without one), then follow live ones
    until `done` or `error`."""
    if not JOB_ID.match(job_id):
        raise JobNotFound(f"No job `{job_id}`.")
    owned_job(job_id)  # another tenant's job answers 404, as an unknown one
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    if not STREAM_ID.match(after) or not _in_range(after):
        raise InvalidEventId("Last-Event-ID must be an event id this stream sent (like `1700000000000-0`).")
    held = services()
    tenant = current_tenant()
    held.streams.take(tenant)
    response = Response(
        stream_with_context(_follow(held.stream_redis, held.hub, job_id, after)),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies must not buffer it
    )
    response.call_on_close(lambda: held.streams.give(tenant))
    return response


def _in_range(event_id: str) -> bool:
    """Both parts of a stream entry id are unsigned 64-bit numbers."""
    return all(int(part) < 2**64 for part in event_id.split("-"))


def _follow(redis: Redis, hub: StreamHub, job_id: str, after: str) -> Iterator[str]:
    for event in follow(redis, hub, job_id, lambda: False, after, idle_ms=KEEPALIVE_MS):
        yield ": keep-alive\n\n" if event is None else sse(event.kind, json.dumps(event.data), event.id)


def sse(event: str, data: str, event_id: str | None) -> str:
    """One Server-Sent Event."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {data}\n\n"
