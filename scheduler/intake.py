"""Taking jobs from `incoming` without losing them, and handing the same job to a worker queue.

The one place the scheduler touches RQ's storage directly (pinned to rq 3.0): it moves job ids off
the `incoming` lists (one per priority, highest first) with LMOVE into an in-flight list, so a
scheduler that dies mid-decision leaves the id where `recover()` finds it, then re-enqueues the
same Job on its target queue and drops the id from the in-flight list in one MULTI/EXEC.
Jobs that must wait (no live worker, memory pressure) sit in a sorted set of held ids, oldest
first, and are re-examined from there.

Redis cannot block on several lists and move atomically, so when all are empty the scheduler waits
on a wake-up list the API pushes to after each enqueue (a job put there another way is still seen
within one take's timeout).
"""

from __future__ import annotations

from typing import Any

import structlog
from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from shared import keys
from shared.queues import fetch_job, open_queue

log = structlog.get_logger()


class Intake:
    """The scheduler's side of the `incoming` queue."""

    def __init__(
        self, redis: Redis, inflight_key: str = keys.SCHEDULER_INFLIGHT, held_key: str = keys.SCHEDULER_HELD
    ):
        self._redis = redis
        self._incoming = [open_queue(name, redis) for name in keys.INCOMING_QUEUES]
        self._inflight, self._held = inflight_key, held_key

    def recover(self) -> int:
        """Put ids a previous scheduler left in flight back at the head of their `incoming` queue."""
        moved = 0
        for raw in self._redis.lrange(self._inflight, 0, -1)[::-1]:
            job_id = _text(raw)
            try:
                origin = fetch_job(job_id, self._redis).origin or keys.INCOMING_QUEUE
            except NoSuchJobError:
                origin = keys.INCOMING_QUEUE  # take() will find it gone and drop it
            pipe = self._redis.pipeline()
            pipe.lrem(self._inflight, 1, job_id)
            pipe.lpush(open_queue(origin, self._redis).key, job_id)
            pipe.execute()
            moved += 1
            log.warning("job_recovered", job_id=job_id)
        return moved

    def take(self, timeout: float) -> Job | None:
        """The next job from `incoming`, highest priority first, waiting up to `timeout` seconds for
        one to arrive; None when there is none."""
        raw = self._take_now()
        if raw is None:
            self._redis.blpop([keys.SCHEDULER_WAKE], timeout)  # type: ignore[arg-type]
            raw = self._take_now()
        if raw is None:
            return None
        job_id = _text(raw)
        try:
            return fetch_job(job_id, self._redis)
        except NoSuchJobError:
            # Deleted or expired while queued: nothing left to route.
            self._redis.lrem(self._inflight, 1, job_id)
            log.warning("job_vanished", job_id=job_id)
            return None

    def _take_now(self) -> Any:
        for queue in self._incoming:
            if (raw := self._redis.lmove(queue.key, self._inflight, "LEFT", "RIGHT")) is not None:
                return raw
        return None

    def hand_over(self, job: Job, target: Queue) -> None:
        """Enqueue `job` (with its updated meta) on `target` and forget it here, atomically."""
        pipe = self._redis.pipeline()
        target.enqueue_job(job, pipeline=pipe)
        self._forget(pipe, job.id)
        pipe.execute()

    def hold(self, job: Job, received: float) -> None:
        """Keep `job` (its meta says why) among the held, in order of arrival, until re-examined."""
        job.save_meta()
        pipe = self._redis.pipeline()
        pipe.zadd(self._held, {job.id: received})
        pipe.lrem(self._inflight, 1, job.id)
        pipe.execute()

    def held(self) -> list[str]:
        """Ids of held jobs, oldest first."""
        return [_text(raw) for raw in self._redis.zrange(self._held, 0, -1)]

    def fetch_held(self, job_id: str) -> Job | None:
        """A held job, or None (and forgotten) when it no longer exists."""
        try:
            return fetch_job(job_id, self._redis)
        except NoSuchJobError:
            self._redis.zrem(self._held, job_id)
            return None

    def reject(self, job: Job, ttl: int) -> None:
        """End `job` without running it (its meta says why); it expires after `ttl` seconds."""
        job.save_meta()
        job.cancel()
        pipe = self._redis.pipeline()
        pipe.expire(job.key, ttl)
        self._forget(pipe, job.id)
        pipe.execute()

    def _forget(self, pipe: Any, job_id: str) -> None:
        pipe.lrem(self._inflight, 1, job_id)
        pipe.zrem(self._held, job_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
