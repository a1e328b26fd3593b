"""What is kept about a job and for how long: a tombstone that outlives the job (so an expired id
answers 410, not 404) and each tenant's index of recent jobs (what `GET /v1/jobs` pages through)."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from redis.client import Pipeline

from shared import keys


def remember(pipe: Pipeline, job_id: str, tenant: str, received: float, retention: int) -> None:
    """Record a new job: its tombstone (retention plus a week) and its place in the tenant's index
    (in `pipe`: the transaction that creates the job)."""
    index = keys.tenant_jobs(tenant)
    pipe.set(
        keys.tombstone(job_id),
        json.dumps({"tenant": tenant, "received": received, "retention": retention}),
        ex=retention + keys.TOMBSTONE_TTL,
    )
    pipe.zadd(index, {job_id: received})
    pipe.zremrangebyscore(index, 0, received - retention)  # jobs past retention are gone anyway
    pipe.expire(index, retention)


def tombstone(redis: Redis, job_id: str) -> dict[str, Any] | None:
    """What the tombstone of `job_id` says (its tenant, when received), or None if there is none."""
    raw = redis.get(keys.tombstone(job_id))
    return json.loads(raw) if raw else None


def recent_ids(redis: Redis, tenant: str, limit: int, after: str | None = None) -> tuple[list[str], bool]:
    """Up to `limit` of `tenant`'s job ids, newest first, after the id `after` (exclusive); and whether
    more follow. An `after` no longer indexed starts from the newest."""
    index = keys.tenant_jobs(tenant)
    start = 0
    if after is not None:
        rank = redis.zrevrank(index, after)
        start = 0 if rank is None else int(rank) + 1  # type: ignore[arg-type]
    raw = redis.zrevrange(index, start, start + limit)  # one more than asked: is there a next page?
    ids = [r.decode() if isinstance(r, bytes) else str(r) for r in raw]
    return ids[:limit], len(ids) > limit


def forget(redis: Redis, tenant: str, job_id: str) -> None:
    """Drop `job_id` from the tenant's index (its record expired)."""
    redis.zrem(keys.tenant_jobs(tenant), job_id)
