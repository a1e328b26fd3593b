"""Following a job's event stream for a request that waits on it: the OpenAI endpoints' sync answer
and their Server-Sent Events. Events are read in short blocks, between which the client's connection
and jobs that end without (more) events (rejected, cancelled or expired while waiting) are checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from redis import Redis
from redis.exceptions import RedisError

from shared.contract import JobStatus
from shared.jobstore import events, lifecycle, rqstore
from shared.jobstore.events import ClientGone, JobEvent
from shared.jobstore.hub import StreamHub
from shared.jobstore.views import build_view

__all__ = ["ClientGone", "JobEvent", "follow"]


def follow(
    redis: Redis,
    hub: StreamHub | None,
    job_id: str,
    client_gone: Callable[[], bool],
    after: str = "0-0",
    relay: bool = True,
    idle_ms: int = events.BLOCK_MS,
) -> Iterator[JobEvent | None]:
    """The job's events after stream entry `after` through the jobstore's reader (the process's
    `hub` when given, else a blocking read on `redis`), one consistent run across retries
    (`events.AttemptRelay`), ending with the job's own ending when it ended without (more) events
    (rejected, cancelled or expired while waiting). Without `relay`, the raw events (for a reader
    that only waits for the ending)."""
    ending = lambda: _ending_without_stream(redis, job_id)  # noqa: E731
    source = hub or redis
    if not relay:
        return events.follow(source, job_id, client_gone, ending, after, idle_ms)
    return events.follow_runs(source, job_id, client_gone, ending, after, idle_ms)


def _ending_without_stream(redis: Redis, job_id: str) -> JobEvent | None:
    try:
        if not rqstore.may_have_ended(job_id, redis):
            return None
    except RedisError:  # busy or briefly unreachable: asked again after the next block
        return None
    job = lifecycle.fetch(redis, job_id)
    if job is None:
        return JobEvent(events.ERROR, {"code": "job_expired", "message": "The job expired."})
    rq_status = job.get_status(refresh=False)
    result = job.return_value() if rq_status == "finished" else None
    view = build_view(job.id, lifecycle.read(job), rq_status, result)
    if view.status is JobStatus.FINISHED and view.result is not None:
        return JobEvent(
            events.DONE, {**view.result.model_dump(mode="json"), "timings": view.timestamps.model_dump()}
        )
    if view.status in ENDED_WITHOUT_RESULT:
        error = (
            view.error.model_dump()
            if view.error is not None
            else {"code": "job_failed", "message": "The job failed."}
        )
        return JobEvent(events.ERROR, error)
    return None


ENDED_WITHOUT_RESULT = (JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED)
"""Statuses after which a job's stream gets no more events."""
