"""`GET /v1/jobs/<id>/events`: a job's events as Server-Sent Events, resumable with Last-Event-ID."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request, stream_with_context
from redis import Redis
from rq.exceptions import NoSuchJobError

from api.jobs import JOB_ID, job_view
from api.services import services
from api.tenancy import owned_job
from shared import keys
from shared.contract import JobStatus
from shared.errors import JobNotFound, ValidationFailed
from shared.queues import fetch_job

bp = Blueprint("events", __name__, url_prefix="/v1/jobs")

BLOCK_MS = 2000
"""Milliseconds one XREAD waits: under the API client's 5 s socket timeout, and the keep-alive pace."""

BATCH = 200
"""Stream entries read at once."""

TERMINAL_EVENTS = ("done", "error")
STREAM_ID_CHARS = set("0123456789-")


@bp.get("/<job_id>/events")
def events(job_id: str) -> Response:
    """Replay the job's events after Last-Event-ID (all of them without one), then follow live ones
    until `done` or `error`."""
    if not JOB_ID.match(job_id):
        raise JobNotFound(f"No job `{job_id}`.")
    redis = services().redis
    owned_job(job_id)  # another tenant's job answers 404, as an unknown one
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    if not set(after) <= STREAM_ID_CHARS:
        raise ValidationFailed("Last-Event-ID must be an event id this stream sent.")
    body = stream_with_context(_follow(redis, job_id, after))
    return Response(
        body,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies must not buffer it
    )


def _follow(redis: Redis, job_id: str, after: str) -> Iterator[str]:
    key = keys.job_stream(job_id)
    while True:
        read = redis.xread({key: after}, count=BATCH, block=BLOCK_MS)
        entries = read[0][1] if read else []
        for entry_id, fields in entries:
            after = _text(entry_id)
            event = _text(fields[b"event"])
            yield sse(event, _text(fields[b"data"]), after)
            if event in TERMINAL_EVENTS:
                return
        if entries:
            continue
        ending = _ending_without_stream(redis, job_id)
        if ending is not None:
            yield ending
            return
        yield ": keep-alive\n\n"


def _ending_without_stream(redis: Redis, job_id: str) -> str | None:
    """The last event of a job that ended without (more) stream entries: rejected before any worker
    saw it, or its stream expired; None while the job may still produce events."""
    try:
        view = job_view(fetch_job(job_id, redis))
    except NoSuchJobError:
        return sse("error", json.dumps({"code": "job_not_found", "message": "The job expired."}), None)
    if view.status is JobStatus.FINISHED and view.result is not None:
        timings = view.timestamps.model_dump()
        data: dict[str, Any] = {**view.result.model_dump(mode="json"), "timings": timings}
        return sse("done", json.dumps(data), None)
    if view.status in (JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED):
        error = {"code": "job_failed", "message": "The job failed."}
        if view.error is not None:
            error = view.error.model_dump()
        return sse("error", json.dumps(error), None)
    return None


def sse(event: str, data: str, event_id: str | None) -> str:
    """One Server-Sent Event."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
