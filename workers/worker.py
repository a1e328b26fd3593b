"""The worker's RQ loop: a no-fork RQ worker (the model stays loaded across jobs) that waits for jobs
in short turns so memory pressure can pause it, hands every generation job to a session
(workers/session.py), and hands its running jobs back when it must stop or loses Redis."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.worker import WorkerStatus

from shared import keys
from shared.heartbeat import Heartbeat, WorkerBeat
from shared.jobstore import ledger, lifecycle, rqstore
from shared.metrics import WorkerMetrics
from shared.settings import Settings
from workers import context
from workers.context import WorkerContext
from workers.guard import PAUSE_POLL, MemoryGuard
from workers.kv_budget import KvBudget
from workers.session import BatchSession
from workers.state import Activity, WorkerState
from workers.turns import SessionTurns

log = structlog.get_logger()

PRESSURE_CHECK = 1
"""Seconds one wait for a job lasts before memory pressure is checked again."""

SAME_STOP = 1.0
"""Seconds within which a second stop signal is the first one delivered twice (RQ's own rule)."""


class GenerationWorker(SimpleWorker):
    """A SimpleWorker (jobs run in this process, next to the model) that takes nothing new while its
    memory is over the critical threshold (its `guard`) and keeps what its heartbeat reports in its
    `report` (RQ's worker has a `state` of its own). Each generation job RQ hands it opens a session
    that keeps taking jobs while it has room and runs them together; each stays its own RQ job."""

    def __init__(
        self,
        queues: list[Queue],
        redis: Redis,
        name: str,
        settings: Settings,
        device: str,
        metrics: WorkerMetrics | None = None,
    ):
        super().__init__(
            queues, connection=redis, name=name, serializer=rqstore.SERIALIZER, log_job_description=False
        )
        self.settings = settings
        self.guard = MemoryGuard(settings, device)
        self.report = WorkerState(name, settings, device, self.guard, metrics)
        self.stop_asked = False
        self._stop_signalled: float | None = None
        self._grace_timer: threading.Timer | None = None
        self.on_exit: Callable[[], None] | None = None

    @property
    def activity(self) -> Activity:
        """What the heartbeat says the worker does (not `state`: that is RQ's own property)."""
        return self.report.activity

    @activity.setter
    def activity(self, value: Activity) -> None:
        self.report.activity = value

    @property
    def running(self) -> dict[str, str]:
        """Every job running now: its id and its queue."""
        return self.report.running

    def beat(self) -> WorkerBeat:
        """This worker's state as a heartbeat."""
        return self.report.beat()

    @property
    def stopping(self) -> bool:
        """A stop was requested: take nothing new."""
        return rqstore.stop_requested(self)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # RQ blocks in one long BLPOP; we wait in short ones, so a worker that turns critical while
        # idle stops taking jobs within PRESSURE_CHECK seconds.
        if timeout is None:  # burst mode: one look, no waiting
            self._pause_while_critical()
            return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
        idle_since = time.monotonic()
        while not self.stopping:
            self._pause_while_critical()
            result = super().dequeue_job_and_maintain_ttl(PRESSURE_CHECK, max_idle_time=PRESSURE_CHECK)
            if result is not None:
                return result
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return None
        return None

    def _pause_while_critical(self) -> None:
        # RQ's own worker key stays alive while we wait.
        self.guard.pause_while_critical(lambda: self.stopping, self.heartbeat)

    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.func_name != keys.GENERATE_FUNC:
            super().execute_job(job, queue)  # not a generation: RQ runs it as usual
            return
        try:
            bound = context.current()
        except RuntimeError as exc:  # no model is bound: the job fails, the worker goes on
            execution = rqstore.start_job(self, job, lambda _: None)
            rqstore.fail_job(self, job, queue, execution, (type(exc), exc, None))
            return
        session = self.report.session = self._session(bound)
        try:
            session.run(job, queue)
        except RedisError as exc:  # Redis went away mid-session: not the jobs' fault
            log.warning("batch_lost_redis", error=str(exc), running=list(self.running))
            if self._wait_for_redis():
                self.hand_back_running("its worker lost Redis mid-job")
        finally:
            self.report.session = None
            try:
                self.set_state(WorkerStatus.IDLE)
            except RedisError:
                pass

    def _session(self, bound: WorkerContext) -> BatchSession:
        """A session on the bound model: a batch of up to the batch size, or one row at a time where
        the model cannot batch (its KV cache then lives only inside each generation)."""
        runtime = bound.runtime
        decoder = runtime.decoder()
        if not runtime.can_batch:
            return BatchSession(self, bound, decoder, 1, KvBudget(0, 0), self.report, self.guard)
        store = self.guard.session_store()
        turns = (
            SessionTurns(store, self.connection, self.name, self.settings.session_ttl, runtime.spec.name,
                         bound.metrics)
            if store is not None else None
        )  # fmt: skip
        budget = self.guard.kv_budget(runtime.kv_bytes_per_token())
        size = self.settings.batch_size()
        return BatchSession(self, bound, decoder, size, budget, self.report, self.guard, turns)

    def _wait_for_redis(self) -> bool:
        """Wait until Redis answers again (True), or until a stop is requested (False)."""
        while not self.stopping:
            try:
                self.connection.ping()
                return True
            except RedisError:
                time.sleep(PAUSE_POLL)
        return False

    def hand_back_running(self, reason: str) -> None:
        """Put every job this worker was running back at the front of its queue (not counted as its
        failure): the one way a worker gives its jobs back (lost Redis, shutting down)."""
        for job_id, queue_name in list(self.running.items()):
            try:
                # Marked again first: a job taken just as Redis went away may never have been marked.
                ledger.mark_running(self.connection, job_id, self.name, queue_name)
                lifecycle.hand_back(self.connection, job_id, reason, self.settings.job_max_retries, False)
            except RedisError as exc:  # the reaper hands it back once our heartbeat lapses
                log.warning("hand_back_failed", job_id=job_id, error=str(exc))
        self.report.clear()

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_asked = True  # RQ records a stop only when busy; the restart loop needs it always
        self._stop_signalled = time.monotonic()
        # Warm shutdown (RQ): finish the running jobs, then stop; past the grace period, hand them back.
        if self.running and self._grace_timer is None:
            self._grace_timer = threading.Timer(self.settings.shutdown_grace, self.abandon_running_job)
            self._grace_timer.daemon = True
            self._grace_timer.start()
            log.info("worker_stopping", job_id=next(iter(self.running)), grace_s=self.settings.shutdown_grace)
        super().request_stop(signum, frame)

    def request_force_stop(self, signum: int, frame: Any) -> None:
        # A second signal: hand the running jobs back now instead of letting RQ fail them.
        if self._stop_signalled is not None and time.monotonic() - self._stop_signalled < SAME_STOP:
            return  # the same stop, delivered twice
        self.abandon_running_job()

    def abandon_running_job(self) -> None:
        """Hand every running job back to its queue (not counted as a failure) and exit at once, so
        RQ does not record the interrupted jobs as failed."""
        job_ids = list(self.running)
        self.hand_back_running("its worker shut down")
        log.warning("worker_exiting", handed_back=job_ids)
        if self.on_exit is not None:
            self.on_exit()
        lifecycle.release_own_queue(self.connection, self.name)  # turns routed here are routed afresh
        try:
            self.register_death()
        finally:
            os._exit(0)


def quiet_dequeue_lines(record: logging.LogRecord) -> bool:
    """Drop RQ's per-job dequeue line, logged before the job's ids can be bound: our `job_started`
    event says the same with request id, job id and trace id (a filter for the `rq.worker` logger,
    matched on rq 3.0's message format)."""
    return record.msg != "Worker %s: %s: %s"


def worker_name(queue: str) -> str:
    """A name unique to this process: host, pid and queue."""
    return f"{socket.gethostname()}.{os.getpid()}.{queue}"


def build_worker(
    settings: Settings, redis: Redis, device: str, metrics: WorkerMetrics | None = None
) -> tuple[GenerationWorker, Heartbeat]:
    """The worker for `settings.worker_queue` (its own queue first, where its sessions' turns come,
    then its queues of every priority, highest first, as RQ serves several queues) and the
    heartbeat that reports it."""
    name = worker_name(settings.worker_queue)
    names = [keys.own_queue(name), *keys.queues_by_priority(settings.worker_queue)]
    queues = [rqstore.open_queue(q, redis) for q in names]
    worker = GenerationWorker(queues, redis, name, settings, device, metrics)
    heartbeat = Heartbeat(
        redis, keys.worker_heartbeat(name), worker.beat, settings.heartbeat_interval, settings.heartbeat_ttl
    )
    return worker, heartbeat
