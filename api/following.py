"""Following a job's event stream for a request that waits on it: the OpenAI endpoints' sync answer
and their Server-Sent Events. Events are read in short blocks, between which the client's connection
and jobs that end without (more) events (rejected, cancelled or expired while waiting) are checked."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError

from shared import keys
from shared.contract import JobStatus, JobView
from shared.errors import GptossError
from shared.queues import fetch_job
from shared.views import build_view

BLOCK_MS = 1000
"""Milliseconds one XREAD waits: how soon a closed connection is noticed while no tokens come."""

BATCH = 200
"""Stream entries read at once."""


class ClientGone(Exception):
    """The client closed its connection while waiting."""


@dataclass(frozen=True)
class JobEvent:
    """One event of a job: `start`, `token`, `done` or `error`, with its data."""

    kind: str
    data: dict[str, Any]
    id: str | None = None
    """The stream entry's id (resume after it with Last-Event-ID); None for an ending read from the job."""


def follow(
    redis: Redis, job_id: str, client_gone: Callable[[], bool], after: str = "0-0"
) -> Iterator[JobEvent | None]:
    """The job's events after stream entry `after` (from its first by default), until `done` or
    `error`; None after each empty block (a chance to send a keep-alive). Raises ClientGone as soon
    as `client_gone()` is seen true."""
    key = keys.job_stream(job_id)
    while True:
        if client_gone():
            raise ClientGone(job_id)
        read = redis.xread({key: after}, count=BATCH, block=BLOCK_MS)
        entries = read[0][1] if read else []
        for entry_id, fields in entries:
            after = _text(entry_id)
            event = JobEvent(_text(fields[b"event"]), json.loads(fields[b"data"]), after)
            yield event
            if event.kind in ("done", "error"):
                return
        if entries:
            continue
        ending = _ending_without_stream(redis, job_id)
        if ending is not None:
            yield ending
            return
        yield None


def _ending_without_stream(redis: Redis, job_id: str) -> JobEvent | None:
    try:
        job = fetch_job(job_id, redis)
    except NoSuchJobError:
        return JobEvent("error", {"code": "job_expired", "message": "The job expired."})
    rq_status = job.get_status(refresh=False)
    view = build_view(job.id, job.meta, rq_status, job.return_value() if rq_status == "finished" else None)
    if view.status is JobStatus.FINISHED and view.result is not None:
        return JobEvent(
            "done", {**view.result.model_dump(mode="json"), "timings": view.timestamps.model_dump()}
        )
    if view.status in ENDED_WITHOUT_RESULT:
        error = (
            view.error.model_dump()
            if view.error is not None
            else {"code": "job_failed", "message": "The job failed."}
        )
        return JobEvent("error", error)
    return None


ENDED_WITHOUT_RESULT = (JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED)
"""Statuses after which a job's stream gets no more events."""


ERROR_STATUS = {
    "prompt_too_long": 413,
    "job_cancelled": 409,
    "deadline_exceeded": 504,
    "hold_expired": 503,
    "job_expired": 410,
}
"""HTTP status of a job that ended without a result, by its error code (else 500 or 503)."""


def job_error(code: str, message: str, view: JobView | None = None) -> GptossError:
    """The error answering a request whose job ended without a result."""
    error = GptossError(message)
    rejected = view is not None and view.status is JobStatus.REJECTED
    error.code = code
    error.status = ERROR_STATUS.get(code, 503 if rejected else 500)
    error.kind = "invalid_request_error" if error.status < 500 else "server_error"
    return error


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
