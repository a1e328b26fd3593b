"""How fast the workers drain the backlog, measured from finished jobs, and what to tell a client
who must wait (`Retry-After`)."""

from __future__ import annotations

import math
import time

from redis import Redis
from redis.client import Pipeline

from shared import keys

DRAIN_WINDOW = 60.0
"""Seconds of history the drain rate is measured over."""

RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 120
"""Bounds of a Retry-After answer, seconds."""

RETRY_AFTER_UNKNOWN = 5
"""Retry-After when nothing has finished recently, so no rate is known."""


def record_done(redis: Redis, job_id: str, at: float | None = None) -> None:
    """Note that a job left the workers (finished or failed) at `at`."""
    now = time.time() if at is None else at
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(keys.DRAINED, {job_id: now})
    pipe.zremrangebyscore(keys.DRAINED, 0, now - 5 * DRAIN_WINDOW)
    pipe.expire(keys.DRAINED, int(5 * DRAIN_WINDOW))
    pipe.execute()


def drain_rate(redis: Redis, now: float | None = None, window: float = DRAIN_WINDOW) -> float:
    """Jobs per second the workers finished over the last `window` seconds."""
    now = time.time() if now is None else now
    return int(redis.zcount(keys.DRAINED, now - window, now)) / window


def retry_after(excess: int, rate: float) -> int:
    """Seconds until `excess` jobs have drained at `rate` jobs/s, bounded; a guess when no rate."""
    if rate <= 0:
        return RETRY_AFTER_UNKNOWN
    return max(RETRY_AFTER_MIN, min(RETRY_AFTER_MAX, math.ceil(excess / rate)))


TENANT_BACKLOG_HORIZON = 24 * 3600
"""Seconds after which an entry of a tenant's backlog is dropped as stale (its job long gone)."""


def enter_backlog(pipe: Pipeline, tenant: str, job_id: str, at: float) -> None:
    """Count `job_id` in `tenant`'s backlog until it starts or is rejected (in `pipe`: the
    transaction that creates the job)."""
    key = keys.tenant_backlog(tenant)
    pipe.zadd(key, {job_id: at})
    pipe.zremrangebyscore(key, 0, at - TENANT_BACKLOG_HORIZON)
    pipe.expire(key, TENANT_BACKLOG_HORIZON)


def leave_backlog(redis: Redis | Pipeline, tenant: str | None, job_id: str) -> None:
    """`job_id` no longer waits: it started, or was rejected (`redis` may be the pipeline of the
    transaction that says so)."""
    redis.zrem(keys.tenant_backlog(tenant or keys.DEFAULT_TENANT), job_id)


def tenant_waiting(redis: Redis, tenant: str) -> int:
    """Jobs of `tenant` accepted and not yet started."""
    return int(redis.zcard(keys.tenant_backlog(tenant)))
