"""The running ledger: which worker runs which job now, so the reaper finds a dead worker's jobs."""

from __future__ import annotations

import time

from pydantic import BaseModel
from redis import Redis

from shared import keys


class Running(BaseModel):
    """What a worker records about the job it is running, so it can be found if the worker dies."""

    worker: str
    queue: str
    started_at: float


def entry(worker: str, queue: str, at: float | None = None) -> str:
    """The ledger's entry for a job `worker` runs from `queue` (as stored)."""
    return Running(worker=worker, queue=queue, started_at=time.time() if at is None else at).model_dump_json()


def holder(entry: bytes | str) -> str:
    """The worker named by a ledger entry (as stored)."""
    return Running.model_validate_json(entry).worker


def mark_running(redis: Redis, job_id: str, worker: str, queue: str) -> None:
    """Note that `worker` runs `job_id` now."""
    redis.hset(keys.RUNNING, job_id, entry(worker, queue))


def clear_running(redis: Redis, job_id: str) -> None:
    """`job_id` is no longer running (it ended, or was handed back)."""
    redis.hdel(keys.RUNNING, job_id)


def running(redis: Redis) -> dict[str, Running]:
    """Every job a worker said it runs, by id."""
    return {
        (k.decode() if isinstance(k, bytes) else k): Running.model_validate_json(v)
        for k, v in redis.hgetall(keys.RUNNING).items()
    }
