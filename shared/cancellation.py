"""Cancelling a job: a flag in Redis that the scheduler and the worker (every decode step) read (a
job that still waits is taken out of its queue by shared/jobstore/lifecycle.take_waiting)."""

from __future__ import annotations

import time

from redis import Redis
from redis.exceptions import RedisError

from shared import keys

CANCEL_POLL = 0.05
"""Seconds between two reads of the flag during generation (a decode step on a GPU is ~10-20 ms)."""


def request_cancel(redis: Redis, job_id: str, ttl: int) -> None:
    """Ask for `job_id` to stop; the flag lives `ttl` seconds (the job's retention)."""
    redis.set(keys.cancel_flag(job_id), str(time.time()), ex=ttl)


def cancel_requested(redis: Redis, job_id: str) -> bool:
    """Someone asked `job_id` to stop."""
    return bool(redis.exists(keys.cancel_flag(job_id)))


def cancels_requested(redis: Redis, job_ids: list[str]) -> set[str]:
    """Which of `job_ids` someone asked to stop (one round trip)."""
    if not job_ids:
        return set()
    pipe = redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.exists(keys.cancel_flag(job_id))
    return {job_id for job_id, found in zip(job_ids, pipe.execute(), strict=True) if found}


class CancelWatch:
    """Whether a running job was cancelled, reading Redis at most every `poll` seconds, so it can be
    asked at every decode step."""

    def __init__(self, redis: Redis, job_id: str, poll: float = CANCEL_POLL):
        self._redis, self._job_id, self._poll = redis, job_id, poll
        self._checked = 0.0
        self.cancelled = False

    def __call__(self) -> bool:
        if self.cancelled:
            return True
        now = time.monotonic()
        if now - self._checked >= self._poll:
            self._checked = now
            try:
                self.cancelled = cancel_requested(self._redis, self._job_id)
            except RedisError:  # a lost read must not fail the generation; the next step reads again
                pass
        return self.cancelled
