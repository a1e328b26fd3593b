"""One job's RQ lifecycle driven by hand, for jobs a batch runs side by side: the one place that
calls RQ's worker internals. Pinned to rq 3.0 (`RQ_VERSION`): the steps are those of
`BaseWorker.perform_job` (prepare the execution and the job, then finalize success or failure),
run per job instead of around one `job.perform()` call.

A job taken here is exactly what RQ's own loop would make of it: started registry and execution
while it runs, its status, its result stored as an RQ `Result` (or the failure record and the
failed registry), the finished registry, and nothing left in the started registry.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import rq
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.utils import now
from rq.worker import BaseWorker

RQ_VERSION = "3.0"
"""The rq release whose internals this module follows (checked by the tests)."""

ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


def rq_matches() -> bool:
    """The installed rq is the one this module was written against."""
    return rq.__version__.startswith(RQ_VERSION)


def take_job(worker: BaseWorker) -> tuple[Job, Queue] | None:
    """The next job of the worker's queues (in their order: highest priority first), without waiting."""
    return Queue.dequeue_any(
        worker.queues,
        None,
        connection=worker.connection,
        job_class=worker.job_class,
        serializer=worker.serializer,
    )


def jobs_waiting(worker: BaseWorker) -> bool:
    """Any job waits in the worker's queues (one round trip: cheaper than a pop per queue per step)."""
    pipe = worker.connection.pipeline(transaction=False)
    for queue in worker.queues:
        pipe.llen(queue.key)
    return any(int(n) for n in pipe.execute())


def start_job(worker: BaseWorker, job: Job) -> Execution:
    """Mark `job` started by `worker`: its execution in the started registry, status `started`."""
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=len(worker.queues) == 1)
    job.started_at = now()
    return execution


def finish_job(worker: BaseWorker, job: Job, queue: Queue, execution: Execution, result: Any) -> None:
    """`job` returned `result`: stored as RQ stores a job function's return value."""
    worker._finalize_success(job, queue, execution, result)


def fail_job(worker: BaseWorker, job: Job, queue: Queue, execution: Execution, exc_info: ExcInfo) -> None:
    """`job` raised: failed as RQ fails a job whose function raised (traceback, failed registry)."""
    worker._finalize_failure(job, queue, execution, exc_info)


def return_job(job: Job, queue: Queue) -> None:
    """Put a job taken but not started back at the front of its queue (it stays `queued`)."""
    queue.push_job_id(job.id, at_front=True)


def keep_alive(worker: BaseWorker, jobs: list[Job]) -> None:
    """Renew the worker's RQ key while a long batch runs (RQ renews it only between jobs)."""
    ttl = max((worker.get_heartbeat_ttl(job) for job in jobs), default=None)
    worker.heartbeat(ttl)
