"""The job's lifecycle as named operations, each the only implementation of its rule.

    enqueue ─> (scheduler) hand_over | hold | end_unstarted
    hand_over ─> (worker) start ─> finish | fail | hand_back
    create_finished (a response-cache hit: never queued)

Every operation reads and writes the job's record through `read`/`write` (no other module touches
job.meta) and RQ's storage through `rqstore` (no other module touches RQ's keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import structlog
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.exceptions import NoSuchJobError
from rq.job import Job

from shared import keys
from shared.cancellation import request_cancel
from shared.drain import leave_backlog
from shared.jobstore import events, ledger, rqstore
from shared.jobstore.record import Ending, JobRecord
from shared.replication import acknowledge

log = structlog.get_logger()

HandBack = Literal["requeued", "failed", "gone"]


def read(job: Job) -> JobRecord:
    """The record of `job` as last fetched (validated)."""
    return JobRecord.from_meta(job.meta)


def reload(job: Job) -> JobRecord:
    """The record of `job` as stored now."""
    return JobRecord.from_meta(job.get_meta(refresh=True))


def write(job: Job, record: JobRecord, pipeline: Any = None) -> None:
    """Store `record` as the record of `job`."""
    job.meta = record.to_meta()
    job.save_meta() if pipeline is None else pipeline.hset(job.key, "meta", job.serializer.dumps(job.meta))


def fetch(redis: Redis, job_id: str) -> Job | None:
    """The job `job_id`, or None when it does not exist (any more)."""
    try:
        return rqstore.fetch_job(job_id, redis)
    except NoSuchJobError:
        return None


def enqueue(
    redis: Redis,
    payload: dict[str, Any],
    record: JobRecord,
    *,
    timeout: int,
    description: str,
    also: Callable[[Pipeline, str], None] | None = None,
) -> Job:
    """A new job of `payload` on the `incoming` queue of its priority, its record as given; the
    scheduler is woken to take it. One transaction, with the writes of `also` (given the pipeline
    and the job's id): the job never exists without them."""
    queue = rqstore.open_queue(keys.priority_queue(keys.INCOMING_QUEUE, record.priority), redis)
    job = queue.create_job(
        keys.GENERATE_FUNC,
        args=(payload,),
        meta=record.to_meta(),
        description=description,  # RQ logs descriptions; the default would hold the prompt
        timeout=timeout,
        result_ttl=record.retention,
        failure_ttl=record.retention,
    )
    pipe = redis.pipeline()
    queue.enqueue_job(job, pipeline=pipe)
    pipe.lpush(keys.SCHEDULER_WAKE, job.id)
    pipe.ltrim(keys.SCHEDULER_WAKE, 0, 0)
    if also is not None:
        also(pipe, job.id)
    pipe.execute()
    acknowledge(redis, "accepted job")  # a 202 promises a job a failover cannot lose
    return job


def create_finished(
    redis: Redis, payload: dict[str, Any], record: JobRecord, result: dict[str, Any], description: str
) -> Job:
    """A job finished with `result` from its creation (a response-cache hit), its whole event stream
    written, so every way of reading a job answers at once."""
    job = rqstore.create_finished(
        redis,
        keys.GENERATE_FUNC,
        payload,
        result,
        queue=keys.priority_queue(keys.INCOMING_QUEUE, record.priority),
        meta=record.to_meta(),
        ttl=record.retention,
        description=description,
    )
    events.write_whole(redis, str(job.id), result, record.timestamps.model_dump(), record.retention)
    acknowledge(redis, "finished job")
    return job


def end_unstarted(
    redis: Redis,
    job: Job,
    record: JobRecord,
    kind: Ending,
    code: str,
    message: str,
    leaving: Callable[[Pipeline], None] | None = None,
) -> None:
    """End a job that never ran (`kind`: rejected, cancelled or expired): the reason in its record,
    RQ's cancelled state, its retention as its lifetime, out of its tenant's backlog, and out of
    wherever it waited (`leaving` queues those removals), in one transaction."""
    record.end(kind, code, message)
    job.meta = record.to_meta()
    with redis.pipeline() as pipe:
        pipe.multi()
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        if leaving is not None:
            leaving(pipe)
        if not job.is_canceled:
            job.cancel(pipeline=pipe)
        pipe.expire(job.key, record.retention)
        leave_backlog(pipe, record.tenant, job.id)
        pipe.execute()


def cancel(redis: Redis, job: Job, message: str) -> JobRecord | None:
    """A client cancels `job`: the flag that a scheduler or worker holding it stops on, and, when it
    still waits in a queue or among the held, its end (`cancelled`) now, taken out of there in the
    same transaction. The record when it ended now; None when a scheduler or worker holds it."""
    record = reload(job)
    request_cancel(redis, job.id, record.retention)
    lists = [rqstore.queue_key(name) for name in rqstore.waiting_queues(redis)]
    while True:
        with redis.pipeline() as pipe:
            try:
                pipe.watch(*lists, keys.SCHEDULER_HELD, job.key)
                waiting = [key for key in lists if pipe.lpos(key, job.id) is not None]
                held = pipe.zscore(keys.SCHEDULER_HELD, job.id) is not None
                if job.get_status(refresh=True) == "started" or not (waiting or held):
                    return None
                record = JobRecord.from_meta(job.get_meta(refresh=True))
                record.end("cancelled", "job_cancelled", message)
                job.meta = record.to_meta()
                pipe.multi()
                pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
                for key in waiting:
                    pipe.lrem(key, 0, job.id)
                pipe.zrem(keys.SCHEDULER_HELD, job.id)
                if not job.is_canceled:
                    job.cancel(pipeline=pipe)
                pipe.expire(job.key, record.retention)
                leave_backlog(pipe, record.tenant, job.id)
                pipe.execute()
                acknowledge(redis, "cancelled job", strict=False)
                return record
            except WatchError:
                continue


def requeue_front(redis: Redis, job: Job, queue_name: str, *, leaving: str | None = None) -> None:
    """Put `job` at the front of queue `queue_name`, taking it out of the list `leaving` (a queue's
    key, or RQ's intermediate list) in the same transaction."""
    pipe = redis.pipeline()
    # enqueue_job first: it WATCHes dependencies, which must come before any queued command.
    rqstore.enqueue(job, queue_name, pipe, at_front=True)
    if leaving is not None:
        pipe.lrem(leaving, 0, job.id)
    pipe.execute()


def hand_back(
    redis: Redis,
    job_id: str,
    reason: str,
    max_retries: int,
    count_attempt: bool = True,
    owner: str | None = None,
) -> HandBack:
    """Put a job whose worker is gone back on its queue, or fail it once it has been retried
    `max_retries` times (`owner`: only while that worker holds it). The ledger, the record, the
    queue, RQ's registries and the fence change in one transaction, which fails if another
    hand-back (or the job's own end) touched the ledger first: never twice, never lost between."""
    while True:
        with redis.pipeline() as pipe:
            try:
                pipe.watch(keys.RUNNING)
                held = pipe.hget(keys.RUNNING, job_id)
                if held is None or (
                    owner is not None and ledger.Running.model_validate_json(held).worker != owner
                ):
                    return "gone"  # ended, handed back already, or another worker's run now
                job = fetch(redis, job_id)
                if job is None or job.get_status(refresh=True) in rqstore.TERMINAL:
                    pipe.multi()
                    pipe.hdel(keys.RUNNING, job_id)
                    pipe.execute()
                    return "gone"  # it ended after all: the result stands, nothing runs twice
                outcome, record = _hand_back(pipe, job, reason, max_retries, count_attempt)
            except WatchError:
                continue
        # The lost run's fence: a replica that missed it would let that run write again.
        acknowledge(redis, "hand-back", strict=False)
        if outcome == "failed":
            log.warning("job_failed", job_id=job_id, code="worker_lost", retries=record.retries)
        else:
            log.warning("job_requeued", job_id=job_id, reason=reason, retries=record.retries)
        return outcome


def _hand_back(
    pipe: Pipeline, job: Job, reason: str, max_retries: int, count_attempt: bool
) -> tuple[HandBack, JobRecord]:
    """Queue the writes of one hand-back on `pipe` (watching the ledger) and run them: the lost run's
    fence taken away, then the job failed (past its retries) or queued again, and its stream told,
    in one transaction. A lost run goes to the back of its queue (its worker may have died of it:
    it must not absorb every later crash); a job handed back by a worker that stops or lost Redis
    goes to the front (it did nothing wrong)."""
    record = read(job)
    record.retries += 1 if count_attempt else 0
    executions = rqstore.executions_of(job)
    failed = record.retries > max_retries
    data: dict[str, Any]
    if failed:
        message = f"The job's worker was lost {record.retries} times ({reason}); it was not retried again."
        record.end("error", "worker_lost", message)
        event, data = events.ERROR, {"code": "worker_lost", "message": message}
    else:
        event, data = events.RETRY, {"reason": reason, "retry": record.retries}
    job.meta = record.to_meta()
    target = keys.requeue_target(job.origin, record.priority)
    pipe.multi()
    pipe.hdel(keys.RUNNING, job.id)
    pipe.incr(keys.fence(job.id))  # the lost run's token is stale from here: its writes are refused
    pipe.expire(keys.fence(job.id), keys.FENCE_TTL)
    if failed:
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        rqstore.record_failure(job, message, pipe)
    else:
        rqstore.enqueue(job, target, pipe, at_front=not count_attempt)
    rqstore.forget_execution(job, executions, pipe)
    events.add_to(pipe, job.id, event, data, record.retention)
    pipe.execute()
    return ("failed" if failed else "requeued"), record


def release_own_queue(redis: Redis, worker: str) -> list[str]:
    """Jobs waiting in `worker`'s own queue go back to `incoming` (their priority's), to be routed
    afresh with a full prefill; the queue itself is removed. For a worker that stopped or died."""
    queue = rqstore.open_queue(keys.own_queue(worker), redis)
    moved = []
    for job_id in queue.get_job_ids():
        job = fetch(redis, job_id)
        if job is None:
            queue.remove(job_id)
            continue
        target = keys.requeue_target(queue.name, read(job).priority)
        requeue_front(redis, job, target, leaving=queue.key)
        moved.append(job_id)
        log.warning("job_requeued", job_id=job_id, reason=f"worker {worker} is gone", queue=target)
    if queue.is_empty():
        queue.delete(delete_jobs=False)
    return moved


_WAITING = """
local total = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
for i = 3, #KEYS do total = total + redis.call('LLEN', KEYS[i]) end
for _, key in ipairs(redis.call('SMEMBERS', ARGV[1])) do
  if string.sub(key, 1, #ARGV[2]) == ARGV[2] then total = total + redis.call('LLEN', key) end
end
return total
"""
"""Jobs in the scheduler's hands (KEYS[1], KEYS[2]), in the fixed queues (KEYS[3..]) and in the
workers' own queues (those of RQ's queue set ARGV[1] whose key starts with ARGV[2])."""


def waiting_count(redis: Redis) -> int:
    """Jobs accepted but not yet started: in every queue, held, or in the scheduler's hands (one
    round trip: every submission asks). A batch's waiting lines are not counted (the batch quota
    bounds them, and the feeder releases only a few at a time); those held or in hand are."""
    fixed = [rqstore.queue_key(name) for name in keys.INTERACTIVE_QUEUES]
    own = rqstore.queue_key(keys.OWN_QUEUE_PREFIX)
    script = redis.register_script(_WAITING)
    return int(script(keys=[keys.SCHEDULER_INFLIGHT, keys.SCHEDULER_HELD, *fixed],
                      args=[rqstore.QUEUE_SET, own]))  # fmt: skip
