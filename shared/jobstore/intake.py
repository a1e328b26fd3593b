"""Taking jobs from `incoming` without losing them, and handing the same job to a worker queue.

The scheduler's side of RQ's storage (pinned with shared/jobstore/rqstore.py): it moves job ids off
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
from rq.job import Job

from shared import keys
from shared.jobstore import lifecycle, rqstore
from shared.jobstore.record import Ending, JobRecord

log = structlog.get_logger()

_TAKE_NOW = """
for i = 2, #KEYS do
  local id = redis.call('LMOVE', KEYS[i], KEYS[1], 'LEFT', 'RIGHT')
  if id then return id end
end
return false
"""
"""The first id of the first non-empty `incoming` list (KEYS[2..], highest priority first), moved to
the in-flight list (KEYS[1]): one round trip however many priorities are empty."""


class Intake:
    """The scheduler's side of the `incoming` queue."""

    def __init__(
        self, redis: Redis, inflight_key: str = keys.SCHEDULER_INFLIGHT, held_key: str = keys.SCHEDULER_HELD
    ):
        self._redis = redis
        self._incoming = [rqstore.queue_key(name) for name in keys.INCOMING_QUEUES]
        self._inflight, self._held = inflight_key, held_key
        self._take_script = redis.register_script(_TAKE_NOW)

    def recover(self) -> int:
        """Put ids a previous scheduler left in flight back at the head of their `incoming` queue."""
        moved = 0
        for raw in self._redis.lrange(self._inflight, 0, -1)[::-1]:
            job_id = _text(raw)
            job = lifecycle.fetch(self._redis, job_id)
            # Gone: take() will find it so and drop it.
            origin = (job.origin if job is not None else None) or keys.INCOMING_QUEUE
            pipe = self._redis.pipeline()
            pipe.lrem(self._inflight, 1, job_id)
            pipe.lpush(rqstore.queue_key(origin), job_id)
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
        job = lifecycle.fetch(self._redis, job_id)
        if job is None:  # deleted or expired while queued: nothing left to route
            self._redis.lrem(self._inflight, 1, job_id)
            log.warning("job_vanished", job_id=job_id)
        return job

    def _take_now(self) -> Any:
        return self._take_script(keys=[self._inflight, *self._incoming]) or None

    def hand_over(self, job: Job, record: JobRecord, target: str) -> None:
        """Enqueue `job` (with its updated record) on queue `target` and forget it here, atomically."""
        job.meta = record.to_meta()
        pipe = self._redis.pipeline()
        rqstore.enqueue(job, target, pipe)
        self._forget(pipe, job.id)
        pipe.execute()

    def hold(self, job: Job, record: JobRecord, received: float) -> None:
        """Keep `job` (its record says why) among the held, in order of arrival, until re-examined."""
        job.meta = record.to_meta()
        pipe = self._redis.pipeline()
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        pipe.zadd(self._held, {job.id: received})
        pipe.lrem(self._inflight, 1, job.id)
        pipe.execute()

    def held(self) -> list[str]:
        """Ids of held jobs, oldest first."""
        return [_text(raw) for raw in self._redis.zrange(self._held, 0, -1)]

    def fetch_held(self, job_id: str) -> Job | None:
        """A held job, or None (and forgotten) when it no longer exists."""
        job = lifecycle.fetch(self._redis, job_id)
        if job is None:
            self._redis.zrem(self._held, job_id)
        return job

    def end_unrouted(self, job: Job, record: JobRecord, kind: Ending, code: str, message: str) -> None:
        """End a job in the scheduler's hands without running it (rejected, cancelled, expired)."""
        lifecycle.end_unstarted(
            self._redis, job, record, kind, code, message, leaving=lambda pipe: self._forget(pipe, job.id)
        )

    def _forget(self, pipe: Any, job_id: str) -> None:
        pipe.lrem(self._inflight, 1, job_id)
        pipe.zrem(self._held, job_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
