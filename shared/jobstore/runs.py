"""A job's runs in a worker: taking it, starting a run (which takes the next fencing token), and
settling it with its result or its failure. Every write of a run counts only while the run holds the
job's fence: a worker that was paused, cut off from Redis or reaped comes back to writes that are
refused, so a job has exactly one result, one terminal event and one webhook.

The fence (`keys.fence`) is a counter that each run's start and each hand-back increments; a run's
token is the value its start took. Its token events are appended by a script that checks the token
(`events.FENCED_XADD`); its settling is one transaction WATCHing the fence: RQ's result or failure,
the record, the terminal event and the running ledger together, or nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue

from shared import keys
from shared.drain import leave_backlog
from shared.jobstore import fair_queue, ledger, lifecycle, rqstore
from shared.jobstore.events import DONE, ERROR, Fence
from shared.jobstore.record import Ending, JobRecord
from shared.replication import acknowledge

Settled = Literal["settled", "superseded"]


def take(
    redis: Redis,
    worker: str,
    queues: list[str],
    *,
    weights: Mapping[str, float] | None = None,
    skip_tenants: Collection[str] = (),
) -> tuple[Job, str] | None:
    """The next job of `queues` (in their order; within a priority queue, the job of the tenant most
    behind in weighted service: shared/jobstore/fair_queue.py), taken by `worker`: out of its queue
    and recorded in the running ledger in one step, so a worker that dies before starting it leaves
    it where the reaper finds it. None when no queue holds a job of a tenant outside `skip_tenants`.
    `weights`: tenant -> weight (1 when unnamed; None: every tenant weighs 1)."""
    entries = [ledger.entry(worker, name) for name in queues]
    while True:
        taken = fair_queue.pick(redis, queues, entries, weights or {}, skip_tenants)
        if taken is None:
            return None
        job_id, index = taken
        job = lifecycle.fetch(redis, job_id)
        if job is not None:
            return job, queues[index]
        redis.hdel(keys.RUNNING, job_id)  # deleted or expired while queued: nothing to run


def give_back(redis: Redis, job: Job, queue: str) -> None:
    """A job taken but not started (it did not fit) goes back to the front of `queue`, out of the
    running ledger, in one transaction; it stays `queued`."""
    pipe = redis.pipeline()
    pipe.lpush(rqstore.queue_key(queue), job.id)
    pipe.hdel(keys.RUNNING, job.id)
    rqstore.wake_workers(pipe, queue)
    pipe.execute()


def _next_token(redis: Redis, job_id: str) -> int:
    pipe = redis.pipeline()
    pipe.incr(keys.fence(job_id))
    pipe.expire(keys.fence(job_id), keys.FENCE_TTL)
    token = int(pipe.execute()[0])
    # Before the run writes anything: a promoted replica without this token would hand the next
    # run the same one, and two runs would both hold the fence.
    acknowledge(redis, "run's fencing token")
    return token


def fence_of(job: Job, token: int) -> Fence:
    """The fence a run of `job` holds with `token`."""
    return Fence(keys.fence(job.id), token)


def start(redis: Redis, worker: Any, job: Job, record: JobRecord, queue: str) -> Execution:
    """`worker` (an RQ worker) starts a run of `job` from `queue`: the run's attempt number, its
    fencing token (taken atomically), then in one transaction RQ's started state and execution, the
    start stamped in the record, the job in the running ledger (so the reaper finds it if the worker
    dies) and out of its tenant's backlog. Returns RQ's execution of the run."""
    record.attempt = _next_token(redis, job.id)
    record.stamp("started")
    job.meta = record.to_meta()

    def also(pipe: Pipeline) -> None:
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        pipe.hset(keys.RUNNING, job.id, ledger.entry(worker.name, queue))
        leave_backlog(pipe, record.tenant, job.id)

    return rqstore.start_job(worker, job, also)


def refuse(
    redis: Redis, worker: Any, job: Job, record: JobRecord, kind: Ending, code: str, message: str
) -> tuple[Execution, int]:
    """`worker` took `job` but will not run it (`kind`: cancelled or expired on its way there): a
    fencing token (so only this refusal settles it; no attempt is counted: it never ran), then in
    one transaction RQ's started state (the worker fails it as RQ fails a job that raised), the
    reason in its record and out of its tenant's backlog. Returns RQ's execution and the token."""
    token = _next_token(redis, job.id)
    record.end(kind, code, message)
    job.meta = record.to_meta()

    def also(pipe: Pipeline) -> None:
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        leave_backlog(pipe, record.tenant, job.id)

    return rqstore.start_job(worker, job, also), token


_WRITE_RECORD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], 'meta', ARGV[2])
return 1
"""


def write_record(redis: Redis, job: Job, record: JobRecord, fence: Fence) -> bool:
    """Store the record of a running job, only while its run holds the job's fence (False: the job
    was handed back and nothing was written)."""
    job.meta = record.to_meta()
    meta = job.serializer.dumps(job.meta)
    return bool(redis.eval(_WRITE_RECORD, 2, fence.key, job.key, str(fence.token), meta))


def attempt(redis: Redis, job_id: str) -> int:
    """The job's fence now: the token of its current run (0: it never started)."""
    return int(redis.get(keys.fence(job_id)) or 0)


def settle(
    redis: Redis,
    worker: Any,
    started: tuple[Job, Queue, Execution],
    record: JobRecord,
    fence: Fence,
    ending: tuple[str, dict[str, str]],
    *,
    result: dict[str, Any] | None = None,
    exc_info: rqstore.ExcInfo | None = None,
    webhook: tuple[str, str] | None = None,
) -> Settled:
    """Settle a run: its `result`, or its failure (`exc_info`; the record says why), with its last
    stream event (`ending`, from `JobStream.ending`), in one transaction that commits only while the
    run holds the job's fence. "superseded": the job was handed back (or is another run's) and
    nothing was written; the caller drops the run."""
    job, _, execution = started
    rqstore.ended(worker, job)
    if result is None and record.ending() is None:
        record.end("error", "generation_failed", "Generation failed.")
    job.meta = record.to_meta()
    stream, fields = ending
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(fence.key)
                if int(pipe.get(fence.key) or 0) != fence.token:
                    return "superseded"
                pipe.multi()
                pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
                if result is not None:
                    rqstore.stored_success(worker, job, execution, result, pipe)
                else:
                    assert exc_info is not None
                    rqstore.stored_failure(worker, job, execution, exc_info, pipe)
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
                pipe.expire(stream, record.retention)
                pipe.hdel(keys.RUNNING, job.id)
                if webhook is not None:  # the webhook message outlives a worker that dies now
                    pipe.hset(keys.WEBHOOK_OUTBOX, *webhook)
                pipe.execute()
                acknowledge(redis, "job's end", strict=False)  # written: it cannot be undone
                return "settled"
            except WatchError:
                continue


def done_event(result: dict[str, Any], record: JobRecord) -> tuple[str, dict[str, Any]]:
    """The `done` event of a run that produced `result` (the record stamps it finished now)."""
    record.stamp("finished")
    return DONE, {**result, "timings": record.timestamps.model_dump(exclude_none=True)}


def error_event(record: JobRecord) -> tuple[str, dict[str, Any]]:
    """The `error` event of a run that ended without a result (its record says why)."""
    reason = record.ending()
    if reason is None:
        return ERROR, {"code": "generation_failed", "message": "Generation failed."}
    return ERROR, reason.model_dump()
