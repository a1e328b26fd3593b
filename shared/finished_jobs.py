"""Jobs created already finished (a response-cache hit): the one place in shared/ that calls RQ's job
internals. Pinned to rq 3.0 (`RQ_VERSION`): the job is saved, then stored as `Job._handle_success`
stores a job whose function returned (status `finished`, result as an RQ `Result`, finished
registry) and given its result TTL as `Job.cleanup` does, all in one transaction, so the API,
`GET /v1/jobs` and rq-dashboard see what they see of a job a worker ran."""

from __future__ import annotations

from typing import Any

import rq
from redis import Redis
from rq.job import Job
from rq.utils import now

from shared.queues import SERIALIZER

RQ_VERSION = "3.0"
"""The rq release whose internals this module follows (checked by the tests)."""


def rq_matches() -> bool:
    """The installed rq is the one this module was written against."""
    return rq.__version__.startswith(RQ_VERSION)


def create_finished(
    redis: Redis,
    func: str,
    payload: dict[str, Any],
    result: dict[str, Any],
    *,
    queue: str,
    meta: dict[str, Any],
    ttl: int,
    description: str,
) -> Job:
    """A new job of `func(payload)` on `queue`, finished with `result`, kept `ttl` seconds."""
    job = Job.create(
        func,
        args=[payload],
        connection=redis,
        serializer=SERIALIZER,
        origin=queue,
        meta=meta,
        description=description,
        result_ttl=ttl,
        failure_ttl=ttl,
    )
    job.enqueued_at = job.started_at = job.ended_at = now()
    job._result = result
    with redis.pipeline() as pipe:
        job.save(pipeline=pipe)  # meta included: _handle_success saves the job without it
        job._handle_success(ttl, pipeline=pipe)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        pipe.execute()
    return job
