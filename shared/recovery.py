"""Jobs whose worker is gone: back to their queue (a bounded number of times) or failed with a
reason. Used by the scheduler's reaper (a worker died) and by a worker past its shutdown grace.

Touches RQ's storage (pinned to rq 3.0): the started registry's executions and the failure
record, through RQ's own functions.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import structlog
from pydantic import BaseModel
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry

from shared import keys
from shared.queues import fetch_job, open_queue
from shared.stages import META_PRIORITY

log = structlog.get_logger()

META_ATTEMPTS = "attempts"
META_RETRIES = "retries"


class Running(BaseModel):
    """What a worker records about the job it is running, so it can be found if the worker dies."""

    worker: str
    queue: str
    started_at: float


def mark_running(redis: Redis, job_id: str, worker: str, queue: str) -> None:
    """Note that `worker` runs `job_id` now."""
    entry = Running(worker=worker, queue=queue, started_at=time.time())
    redis.hset(keys.RUNNING, job_id, entry.model_dump_json())


def clear_running(redis: Redis, job_id: str) -> None:
    """`job_id` is no longer running (it ended, or was handed back)."""
    redis.hdel(keys.RUNNING, job_id)


def running(redis: Redis) -> dict[str, Running]:
    """Every job a worker said it runs, by id."""
    return {
        (k.decode() if isinstance(k, bytes) else k): Running.model_validate_json(v)
        for k, v in redis.hgetall(keys.RUNNING).items()
    }


def hand_back(
    redis: Redis, job_id: str, reason: str, max_retries: int, count_attempt: bool = True
) -> Literal["requeued", "failed", "gone"]:
    """Put a job whose worker is gone back at the front of its queue, or fail it once it has been
    retried `max_retries` times. Whoever removes the running entry first does it, so two reapers
    never hand the same job back twice."""
    entry = redis.hget(keys.RUNNING, job_id)
    if entry is None or not redis.hdel(keys.RUNNING, job_id):
        return "gone"
    try:
        return _hand_back(redis, job_id, reason, max_retries, count_attempt)
    except Exception:
        redis.hset(keys.RUNNING, job_id, entry)  # not handed back: the next sweep tries again
        raise


def _hand_back(
    redis: Redis, job_id: str, reason: str, max_retries: int, count_attempt: bool
) -> Literal["requeued", "failed", "gone"]:
    try:
        job = fetch_job(job_id, redis)
    except NoSuchJobError:
        return "gone"
    if job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED):
        return "gone"  # it ended after all: the result stands, nothing runs twice
    origin = open_queue(job.origin, redis)
    queue = open_queue(keys.requeue_target(job.origin, job.meta.get(META_PRIORITY, "normal")), redis)
    retries = int(job.meta.get(META_RETRIES, 0)) + (1 if count_attempt else 0)
    job.meta[META_RETRIES] = retries
    started = StartedJobRegistry(queue=origin)
    if retries > max_retries:
        message = f"The job's worker was lost {retries} times ({reason}); it was not retried again."
        job.meta["error"] = {"code": "worker_lost", "message": message}
        job.save_meta()
        pipe = redis.pipeline()
        started.remove_executions(job, pipeline=pipe)
        record_job_failure(job, message, pipe)
        pipe.execute()
        _stream_event(redis, job_id, "error", {"code": "worker_lost", "message": message})
        log.warning("job_failed", job_id=job_id, code="worker_lost", retries=retries)
        return "failed"
    job.save_meta()
    pipe = redis.pipeline()
    # enqueue_job first: it WATCHes dependencies, which must come before any queued command.
    queue.enqueue_job(job, pipeline=pipe, at_front=True)
    started.remove_executions(job, pipeline=pipe)
    pipe.execute()
    _stream_event(redis, job_id, "retry", {"reason": reason, "retry": retries})
    log.warning("job_requeued", job_id=job_id, reason=reason, retries=retries, queue=queue.name)
    return "requeued"


def _stream_event(redis: Redis, job_id: str, event: str, data: dict[str, Any]) -> None:
    # The stream says the job starts over, so a reader drops what it had and expects tokens anew.
    key = keys.job_stream(job_id)
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, {"event": event, "data": json.dumps(data)})
    pipe.expire(key, keys.STREAM_TTL)
    pipe.execute()


def rescue_dequeued(redis: Redis, queues: list[Any]) -> list[str]:
    """Jobs this worker took off its queues (into RQ's intermediate list) but never started, because
    Redis went away in between: back to the front of their queue. Called when the worker's loop
    starts again; an id still in the started registry is left alone."""
    rescued = []
    for queue in queues:
        intermediate = IntermediateQueue(queue.key, connection=redis)
        started = StartedJobRegistry(queue=queue)
        for job_id in intermediate.get_job_ids():
            if job_id in started:
                continue
            try:
                job = fetch_job(job_id, redis)
            except NoSuchJobError:
                intermediate.remove(job_id)
                continue
            if job.get_status(refresh=True) != JobStatus.QUEUED:
                continue
            pipe = redis.pipeline()
            queue.enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.lrem(intermediate.key, 0, job_id)
            pipe.execute()
            rescued.append(job_id)
            log.warning("job_requeued", job_id=job_id, reason="dequeued but never started", queue=queue.name)
    return rescued
