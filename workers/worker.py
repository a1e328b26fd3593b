"""The no-fork RQ worker: the model stays loaded across jobs, and a thread keeps its heartbeat."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from opentelemetry import context as otel_context
from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.utils import now as utcnow
from rq.worker import WorkerStatus

from shared import keys
from shared.affinity import release_own_queue
from shared.drain import leave_backlog, record_done
from shared.heartbeat import Heartbeat, WorkerBeat
from shared.metrics import WorkerMetrics
from shared.queues import SERIALIZER, open_queue
from shared.recovery import clear_running, hand_back, mark_running
from shared.settings import Settings
from shared.stages import META_REQUEST_ID, META_TENANT
from shared.tracing import context_from
from workers import context
from workers.batching import BatchSession
from workers.kv_budget import KvBudget, budget_bytes
from workers.memory import MemoryReading, read_memory, relieve_memory
from workers.sessions import SessionStore, session_budget

log = structlog.get_logger()

PAUSE_POLL = 0.5
"""Seconds between memory checks while paused over the critical threshold."""

PRESSURE_CHECK = 1
"""Seconds one wait for a job lasts before memory pressure is checked again."""

BATCH_PRESSURE_CHECK = 0.5
"""Seconds a batch reuses one memory reading when deciding whether to take more jobs."""


class GenerationWorker(SimpleWorker):
    """A SimpleWorker (jobs run in this process, next to the model) that reports its state and
    memory, and takes nothing new while its memory is over the critical threshold.

    With a batch size over 1, a generation job RQ hands it opens a batch session (workers/batching.py)
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
            queues, connection=redis, name=name, serializer=SERIALIZER, log_job_description=False
        )
        self.settings, self.model_name, self.device, self.metrics = settings, settings.model, device, metrics
        self.metrics_url: str | None = None
        self.running: dict[str, str] = {}  # job id -> its queue, every job running now
        self.batch_size = settings.batch_size()
        self.session: BatchSession | None = None
        self._kv_budget: KvBudget | None = None
        self._sessions: SessionStore | None = None
        self._pressure_checked, self._may_take = 0.0, True
        self.jobs_done = 0
        self.tokens_per_second: float | None = None
        self.stop_asked = False
        # Not `state`: that is RQ's own property, written to the worker's Redis hash.
        self.activity = "loading"
        self._grace_timer: threading.Timer | None = None
        self.on_exit: Callable[[], None] | None = None

    def memory(self) -> MemoryReading:
        """The device's memory now (or the test override's)."""
        return read_memory(self.device, self.settings.memory_budget_bytes, self.settings.memory_reading_file)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # RQ blocks in one long BLPOP; we wait in short ones, so a worker that turns critical while
        # idle stops taking jobs within PRESSURE_CHECK seconds.
        if timeout is None:  # burst mode: one look, no waiting
            self._pause_while_critical()
            return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
        idle_since = time.monotonic()
        while not self._stop_requested:
            self._pause_while_critical()
            result = super().dequeue_job_and_maintain_ttl(PRESSURE_CHECK, max_idle_time=PRESSURE_CHECK)
            if result is not None:
                return result
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return None
        return None

    def _pause_while_critical(self) -> None:
        """Over critical: take nothing new, give back what can be given, until below warn."""
        if self.memory().pressure < self.settings.memory_critical:
            return
        log.warning("memory_critical_paused", pressure=round(self.memory().pressure, 3))
        self._shed_sessions(self.memory().pressure)
        relieve_memory(self.device)
        while not self._stop_requested and self.memory().pressure >= self.settings.memory_warn:
            self.heartbeat()  # RQ's own worker key stays alive while we wait
            time.sleep(PAUSE_POLL)
        log.info("memory_pressure_relieved", pressure=round(self.memory().pressure, 3))

    @property
    def current_job_id(self) -> str | None:
        """One of the running jobs (the oldest), or None."""
        return next(iter(list(self.running)), None)

    @property
    def stopping(self) -> bool:
        """A stop was requested: take nothing new."""
        return bool(self._stop_requested)

    def may_take(self) -> bool:
        """Memory allows taking another job now (a reading reused for BATCH_PRESSURE_CHECK s)."""
        now = time.monotonic()
        if now - self._pressure_checked >= BATCH_PRESSURE_CHECK:
            self._pressure_checked = now
            pressure = self.memory().pressure
            if pressure >= self.settings.memory_warn:
                self._shed_sessions(pressure)
            self._may_take = pressure < self.settings.memory_critical
        return self._may_take

    def session_store(self) -> SessionStore | None:
        """This worker's session KV caches (None when their budget is 0)."""
        if self._sessions is None:
            budget = session_budget(self.settings.session_cache_bytes, self.memory().total)
            if budget <= 0:
                return None
            self._sessions = SessionStore(budget, self.settings.session_ttl)
        return self._sessions

    def _shed_sessions(self, pressure: float) -> None:
        """Under memory pressure, session caches go first (a later turn only prefills in full)."""
        if self._sessions is not None and len(self._sessions):
            freed = self._sessions.shed()
            log.warning("session_cache_shed", bytes=freed, pressure=round(pressure, 3))

    def kv_budget(self) -> KvBudget:
        """The batch's KV cache budget (from settings, else a share of the device's memory)."""
        if self._kv_budget is None:
            runtime = context.current_runtime()
            total = self.memory().total
            self._kv_budget = KvBudget(
                runtime.kv_bytes_per_token(), budget_bytes(self.settings.kv_cache_budget_bytes, total)
            )
        return self._kv_budget

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self._batches(job):
            self.session = BatchSession(self, context.current(), self.batch_size, self.kv_budget())
            try:
                self.session.run(job, queue)
            except RedisError as exc:  # Redis went away mid-batch: not the jobs' fault
                log.warning("batch_lost_redis", error=str(exc), running=list(self.running))
                self._hand_back_after_outage()
            finally:
                self.session = None
                try:
                    self.set_state(WorkerStatus.IDLE)
                except RedisError:
                    pass
            return
        # RQ's own lines about this job (success, failure, result TTL) carry its ids and trace too.
        structlog.contextvars.bind_contextvars(job_id=job.id, request_id=job.meta.get(META_REQUEST_ID))
        token = otel_context.attach(context_from(job.meta))
        started = time.perf_counter()
        self.job_began(job, queue)
        try:
            super().execute_job(job, queue)
        finally:
            otel_context.detach(token)
            self.job_ended(job, time.perf_counter() - started)
            structlog.contextvars.clear_contextvars()

    def _hand_back_after_outage(self) -> None:
        """Once Redis answers again, put every job the batch was running back on its queue (not
        counted as their failure). Stopped before that: the reaper hands them back."""
        while not self._stop_requested:
            try:
                self.connection.ping()
                break
            except RedisError:
                time.sleep(PAUSE_POLL)
        else:
            return
        for job_id, queue_name in list(self.running.items()):
            try:
                # Re-marked first: a job taken just as Redis went away may never have been marked.
                mark_running(self.connection, job_id, self.name, queue_name)
                hand_back(
                    self.connection,
                    job_id,
                    "its worker lost Redis mid-job",
                    self.settings.job_max_retries,
                    False,
                )
            except RedisError as exc:
                log.warning("hand_back_failed", job_id=job_id, error=str(exc))
        self.running.clear()
        self.activity = "idle"

    def _batches(self, job: Job) -> bool:
        """Run `job` in a batch session: batching is on, the job is a generation and the model
        can batch (tensor-parallel runtimes run one request at a time)."""
        if job.func_name != keys.GENERATE_FUNC:
            return False
        # A session turn goes through the batch path even alone: that is where its cache is reused.
        if self.batch_size <= 1 and not _is_session_turn(job):
            return False
        try:
            return context.current_runtime().can_batch
        except RuntimeError:  # no runtime bound: RQ's plain path reports it per job
            return False

    def job_began(self, job: Job, queue: Queue) -> None:
        """Bookkeeping as a job starts: out of its tenant's backlog, recorded as running."""
        self.running[job.id], self.activity = queue.name, "busy"
        try:
            leave_backlog(self.connection, job.meta.get(META_TENANT), job.id)
        except RedisError as exc:  # bookkeeping only; the job runs regardless
            log.warning("backlog_not_updated", error=str(exc))
        mark_running(self.connection, job.id, self.name, queue.name)  # so the reaper finds it if we die

    def job_ended(self, job: Job, seconds: float) -> None:
        """Bookkeeping as a job ends (finished or failed)."""
        clear_running(self.connection, job.id)
        self._note_done(job, seconds)
        self.running.pop(job.id, None)
        self.jobs_done += 1
        if not self.running:
            self.activity = "idle"

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_asked = True  # RQ records a stop only when busy; the restart loop needs it always
        # Warm shutdown (RQ): finish the running job, then stop; past the grace period, hand it back.
        if self.running and self._grace_timer is None:
            self._grace_timer = threading.Timer(self.settings.shutdown_grace, self.abandon_running_job)
            self._grace_timer.daemon = True
            self._grace_timer.start()
            log.info("worker_stopping", job_id=self.current_job_id, grace_s=self.settings.shutdown_grace)
        super().request_stop(signum, frame)

    def request_force_stop(self, signum: int, frame: Any) -> None:
        # A second signal: hand the running job back now instead of letting RQ fail it.
        if self._shutdown_requested_date and (utcnow() - self._shutdown_requested_date) < timedelta(
            seconds=1
        ):
            return  # the same stop, delivered twice (RQ's own rule)
        self.abandon_running_job()

    def abandon_running_job(self) -> None:
        """Hand every running job back to its queue (not counted as a failure) and exit at once, so
        RQ does not record the interrupted jobs as failed."""
        job_ids = list(self.running)
        for job_id in job_ids:
            hand_back(self.connection, job_id, "its worker shut down", self.settings.job_max_retries, False)
        log.warning("worker_exiting", handed_back=job_ids)
        if self.on_exit is not None:
            self.on_exit()
        release_own_queue(self.connection, self.name)  # turns routed here are routed afresh
        try:
            self.register_death()
        finally:
            os._exit(0)

    def _note_done(self, job: Job, seconds: float) -> None:
        try:
            record_done(self.connection, job.id)
            result = job.return_value(refresh=True)
            if isinstance(result, dict) and seconds > 0:
                self.tokens_per_second = result.get("usage", {}).get("completion_tokens", 0) / seconds
        except RedisError as exc:  # bookkeeping only; the job itself is settled
            log.warning("drain_not_recorded", error=str(exc))

    def beat(self) -> WorkerBeat:
        """This worker's state as a heartbeat (and its memory gauges brought up to date)."""
        memory = self.memory()
        running_jobs = list(self.running)
        running = len(running_jobs)
        session = self.session
        sessions = self._sessions
        if sessions is not None:
            sessions.expire()
        if self.metrics is not None:
            self.metrics.session_cache_bytes.labels(self.model_name).set(sessions.nbytes if sessions else 0)
            self.metrics.memory_used.labels(memory.device).set(memory.used)
            self.metrics.memory_total.labels(memory.device).set(memory.total)
            self.metrics.memory_pressure.labels(memory.device).set(memory.pressure)
            self.metrics.requests_running.labels(self.model_name, self.settings.worker_queue).set(running)
        return WorkerBeat(
            name=self.name,
            queue=self.settings.worker_queue,
            model=self.model_name,
            device=self.device,
            state=self.activity,  # type: ignore[arg-type]
            current_job=running_jobs[0] if running_jobs else None,
            jobs_done=self.jobs_done,
            pid=os.getpid(),
            host=socket.gethostname(),
            at=time.time(),
            metrics_url=self.metrics_url,
            memory_used_bytes=memory.used,
            memory_total_bytes=memory.total,
            pressure=memory.pressure,
            running=running,
            free_slots=max(0, self.batch_size - running),
            tokens_per_second=self.tokens_per_second,
            running_jobs=running_jobs,
            kv_cache_bytes=session.kv_bytes if session is not None else 0,
            kv_cache_budget_bytes=self._kv_budget.budget if self._kv_budget is not None else None,
        )


def _is_session_turn(job: Job) -> bool:
    payload = job.args[0] if job.args else None
    return isinstance(payload, dict) and bool(payload.get("session_id"))


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
    queues = [open_queue(q, redis) for q in names]
    worker = GenerationWorker(queues, redis, name, settings, device, metrics)
    heartbeat = Heartbeat(
        redis, keys.worker_heartbeat(name), worker.beat, settings.heartbeat_interval, settings.heartbeat_ttl
    )
    return worker, heartbeat
