"""Every use of RQ's internals, in one module, pinned to one RQ release (`RQ_VERSION`, checked by the
tests): its key names, its registries, its intermediate queue, the steps of `BaseWorker.perform_job`
run by hand for jobs a batch runs side by side, and a job stored as `Job._handle_success` stores a
job whose function returned. Nothing outside the jobstore package imports from `rq` but the
worker's loop class (a SimpleWorker) and the dashboard mount.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import rq
from redis import Redis
from redis.client import Pipeline
from rq import Queue, Worker
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus
from rq.worker.base import format_exc_info

from shared import keys

RQ_VERSION = "3.0"
"""The rq release whose internals this module follows (checked by the tests)."""

SERIALIZER = JSONSerializer
"""Job arguments, meta and results are plain JSON: safe to read from any process."""

ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]

TERMINAL = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED)
"""RQ statuses a job never leaves."""

REGISTRIES = {
    "started": StartedJobRegistry,
    "finished": FinishedJobRegistry,
    "failed": FailedJobRegistry,
    "canceled": CanceledJobRegistry,
    "deferred": DeferredJobRegistry,
    "scheduled": ScheduledJobRegistry,
}
"""RQ's registries of a queue, by the name its metrics use."""


def rq_matches() -> bool:
    """The installed rq is the one this module was written against."""
    return rq.__version__.startswith(RQ_VERSION)


def open_queue(name: str, redis: Redis) -> Queue:
    """The RQ queue called `name`."""
    return Queue(name, connection=redis, serializer=SERIALIZER)


def enqueue(job: Job, queue: str, pipe: Pipeline, at_front: bool = False) -> None:
    """Put `job` on `queue` (at its back, or `at_front`) in `pipe`, and wake a worker blocked on it.
    On a worker's queue its tenant is noted for the fair take (shared/jobstore/fair_queue.py)."""
    open_queue(queue, job.connection).enqueue_job(job, pipeline=pipe, at_front=at_front)
    if queue not in keys.INCOMING_QUEUES:  # the scheduler takes those in arrival order
        pipe.hset(keys.queued_tenants(queue), job.id, job.meta.get("tenant") or keys.DEFAULT_TENANT)
        pipe.expire(keys.queued_tenants(queue), keys.FAIR_TTL)
    wake_workers(pipe, queue)


def wake_workers(pipe: Pipeline, queue: str) -> None:
    """Tell a worker blocked on `queue`'s wake list that a job is there (in `pipe`)."""
    pipe.lpush(keys.worker_wake(queue), 1)
    pipe.ltrim(keys.worker_wake(queue), 0, keys.WAKE_TOKENS - 1)
    pipe.expire(keys.worker_wake(queue), keys.WAKE_TTL)


def fetch_job(job_id: str, redis: Redis) -> Job:
    """The RQ job `job_id` (raises rq.exceptions.NoSuchJobError)."""
    return Job.fetch(job_id, connection=redis, serializer=SERIALIZER)


def fetch_many(job_ids: list[str], redis: Redis) -> list[Job | None]:
    """The jobs of `job_ids`, in order (None for one that no longer exists)."""
    return Job.fetch_many(job_ids, connection=redis, serializer=SERIALIZER) if job_ids else []


def result_count(job_id: str, redis: Redis) -> int:
    """Results RQ stored for job `job_id` (more than one: it ran to an end twice)."""
    return int(redis.xlen(Result.get_key(job_id)))


def queue_key(name: str) -> str:
    """The Redis list of queue `name`."""
    return Queue.redis_queue_namespace_prefix + name


def job_key(job_id: str) -> str:
    """The Redis hash of job `job_id`."""
    return Job.redis_job_namespace_prefix + job_id


WAITING_OR_RUNNING = frozenset({"queued", "deferred", "scheduled", "started"})
"""RQ statuses of a job that has not ended."""


def may_have_ended(job_id: str, redis: Redis) -> bool:
    """Job `job_id` is gone or its RQ status is not a waiting or running one: one HGET, so the many
    followers of waiting jobs can ask every second without reading whole jobs."""
    status: Any = redis.hget(job_key(job_id), "status")
    return (
        status is None
        or (status.decode() if isinstance(status, bytes) else str(status)) not in WAITING_OR_RUNNING
    )


QUEUE_SET = Queue.redis_queues_keys
"""RQ's set of every queue's key."""


def own_queue_names(redis: Redis) -> list[str]:
    """The workers' own queues (`worker:<name>`) registered in RQ now, sorted."""
    prefix = Queue.redis_queue_namespace_prefix
    names = (m.decode() if isinstance(m, bytes) else m for m in redis.smembers(QUEUE_SET))
    return sorted(n[len(prefix) :] for n in names if n.startswith(prefix + keys.OWN_QUEUE_PREFIX))


def waiting_queues(redis: Redis) -> list[str]:
    """Every queue a job can wait in: the fixed ones, then the workers' own queues."""
    return [*keys.ALL_QUEUES, *own_queue_names(redis)]


def registry_sizes(name: str, redis: Redis) -> dict[str, int]:
    """Jobs in each of RQ's registries of queue `name`, by registry name."""
    queue = open_queue(name, redis)
    return {kind: registry(queue=queue).count for kind, registry in REGISTRIES.items()}


def failed_job_ids(name: str, redis: Redis, limit: int) -> list[str]:
    """The latest ids of failed and cancelled (rejected) jobs of queue `name`, up to `limit` each."""
    queue = open_queue(name, redis)
    return [
        job_id
        for registry in (FailedJobRegistry(queue=queue), CanceledJobRegistry(queue=queue))
        for job_id in registry.get_job_ids(0, limit - 1)
    ]


def workers(redis: Redis) -> list[dict[str, Any]]:
    """The workers RQ knows, as the debug bundle lists them."""
    return [
        {
            "name": w.name,
            "queues": w.queue_names(),
            "state": w.get_state(),
            "current_job": w.get_current_job_id(),
            "last_heartbeat": w.last_heartbeat,
            "successful": w.successful_job_count,
            "failed": w.failed_job_count,
        }
        for w in Worker.all(connection=redis)
    ]


def traceback_of(job: Job) -> str | None:
    """The traceback RQ stored for a failed job, if any."""
    result = job.latest_result()
    return result.exc_string if result is not None and result.type == Result.Type.FAILED else None


# --- storing a job already finished (a response-cache hit) ------------------------------------


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
    """A new job of `func(payload)` on `queue`, finished with `result`, kept `ttl` seconds: saved,
    then stored as `Job._handle_success` stores a job whose function returned (status, result as an
    RQ `Result`, finished registry) and given its TTL as `Job.cleanup` does, in one transaction."""
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


# --- a job whose worker is gone ------------------------------------------------------------------


def executions_of(job: Job) -> list[str]:
    """The started-registry entries of `job`'s runs (read before a transaction forgets them)."""
    return [execution.composite_key for execution in job.get_executions()]


def forget_execution(job: Job, executions: list[str], pipe: Any) -> None:
    """Take `job`'s runs (`executions`) out of its origin queue's started registry: its run is over
    without an ending."""
    if executions:
        pipe.zrem(StartedJobRegistry(queue=open_queue(job.origin, job.connection)).key, *executions)


def record_failure(job: Job, message: str, pipe: Any) -> None:
    """Fail `job` in RQ (status, failed registry, failure record) with `message` as its traceback."""
    record_job_failure(job, message, pipe)


# --- one job's run in a worker, driven by hand (the steps of BaseWorker.perform_job) --------------


def intermediate_key(queue: Queue) -> str:
    """RQ's intermediate list of `queue`."""
    return IntermediateQueue(queue.key, connection=queue.connection).key


def start_job(worker: BaseWorker, job: Job, also: Callable[[Pipeline], None]) -> Execution:
    """Mark `job` started by `worker` as `prepare_execution` and `prepare_job_execution` do (its
    execution in the started registry, status `started`, out of the intermediate list), with the
    writes of `also`, in one transaction."""
    ttl = worker.get_heartbeat_ttl(job)
    with worker.connection.pipeline() as pipe:
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        worker.heartbeat(ttl, pipeline=pipe)
        job.heartbeat(now(), ttl, pipeline=pipe)
        job.prepare_for_execution(worker.name, pipeline=pipe)
        pipe.persist(job.key)
        pipe.lrem(open_queue(job.origin, worker.connection).intermediate_queue_key, 1, job.id)
        also(pipe)
        pipe.execute()
    worker.executions[execution.id] = execution
    job.started_at = now()
    return execution


def ended(worker: BaseWorker, job: Job) -> None:
    """A run is over (before its job is settled): its end time, as `handle_execution_ended` notes it."""
    job.ended_at = now()


def stored_success(worker: BaseWorker, job: Job, execution: Execution, result: Any, pipe: Pipeline) -> None:
    """Queue on `pipe` (in a transaction) the writes of `handle_job_success` for a job whose run
    returned `result`: its result as an RQ `Result`, status finished, finished registry, result TTL,
    the execution cleaned up, the worker's counters."""
    job._result, job._status = result, JobStatus.FINISHED
    ended_at = job.ended_at or now()
    worker.increment_successful_job_count(pipeline=pipe)
    if job.started_at is not None:
        worker.increment_total_working_time(ended_at - job.started_at, pipe)
    ttl = job.get_result_ttl(worker.default_result_ttl)
    if ttl != 0:
        job._handle_success(
            ttl,
            pipeline=pipe,
            worker_name=worker.name,
            execution_id=execution.id,
            execution_started_at=execution.created_at,
            execution_ended_at=ended_at,
        )
    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
    worker.cleanup_execution(job, pipeline=pipe, execution=execution)


def stored_failure(
    worker: BaseWorker, job: Job, execution: Execution, exc_info: ExcInfo, pipe: Pipeline
) -> None:
    """Queue on `pipe` (in a transaction) the writes of `handle_job_failure` for a job whose run
    raised: status failed, the traceback as a failure `Result`, failed registry, the execution
    cleaned up, the worker's counters (a job here is never retried by RQ: hand-backs are ours)."""
    job._status = JobStatus.FAILED
    ended_at = job.ended_at or now()
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    worker.cleanup_execution(job, pipeline=pipe, execution=execution)
    job._handle_failure(
        format_exc_info(exc_info),
        pipeline=pipe,
        worker_name=worker.name,
        execution_id=execution.id,
        execution_started_at=execution.created_at,
        execution_ended_at=ended_at,
    )
    worker.increment_failed_job_count(pipe)
    if job.started_at is not None:
        worker.increment_total_working_time(ended_at - job.started_at, pipe)


def fail_job(worker: BaseWorker, job: Job, queue: Queue, execution: Execution, exc_info: ExcInfo) -> None:
    """`job` raised: failed as RQ fails a job whose function raised (traceback, failed registry)."""
    worker._finalize_failure(job, queue, execution, exc_info)


def keep_alive(worker: BaseWorker, jobs: list[Job]) -> None:
    """Renew the worker's RQ key while a long batch runs (RQ renews it only between jobs)."""
    ttl = max((worker.get_heartbeat_ttl(job) for job in jobs), default=None)
    worker.heartbeat(ttl)


def stop_requested(worker: BaseWorker) -> bool:
    """RQ's loop was asked to stop (a signal)."""
    return bool(worker._stop_requested)
