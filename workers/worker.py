"""The worker's RQ loop: a no-fork RQ worker (the model stays loaded across jobs) that waits for jobs
in short turns so memory pressure can pause it, hands every generation job to a session
(workers/session.py), and hands its running jobs back when it must stop or loses Redis.

The outage path: wherever Redis fails the worker (its session, its wait for jobs, RQ's own loop and
teardown), it takes nothing new, waits for Redis with backoff, hands back every job it was running
(to the front of its queue, not counted against the job) and goes on; it never exits for it."""

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
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.worker import WorkerStatus
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from shared import keys
from shared.heartbeat import Heartbeat, WorkerBeat
from shared.jobstore import ledger, lifecycle, rqstore, runs
from shared.metrics import WorkerMetrics
from shared.settings import Settings
from workers import context, fair_share
from workers.context import WorkerContext
from workers.guard import MemoryGuard
from workers.kv_budget import KvBudget
from workers.session import BatchSession
from workers.state import Activity, WorkerState
from workers.turns import SessionTurns

log = structlog.get_logger()

PRESSURE_CHECK = 1
"""Seconds between memory checks (and renewals of RQ's worker key) while waiting for a job; also the
longest a job put on a queue without a wake-up (by hand, or by RQ's own tools) waits for an idle
worker."""

SAME_STOP = 1.0
"""Seconds within which a second stop signal is the first one delivered twice (RQ's own rule)."""

REDIS_WAIT = wait_exponential(multiplier=0.5, max=5)
"""Backoff between attempts to reach Redis again after losing it."""

LOST_REDIS = "its worker lost Redis mid-job"
"""Why the jobs of a worker that lost Redis went back to their queue."""

LOOP_ENDED = "its worker's loop ended unexpectedly"
"""Why the jobs of a worker whose RQ loop ended without a stop went back to their queue."""


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
        """A stop was requested (a signal, or RQ's own stop): take nothing new."""
        return self.stop_asked or rqstore.stop_requested(self)

    def ask_stop(self) -> None:
        """Stop once what runs now is over (a signal that came between two runs of RQ's loop)."""
        self.stop_asked = True

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        while True:
            try:
                return self._wait_for_job(timeout, max_idle_time)
            except RedisError as exc:  # RQ's loop would end on it: the outage path instead
                if not self.ride_out_outage(exc):
                    return None

    def _wait_for_job(self, timeout: int | None, max_idle_time: int | None) -> tuple[Job, Queue] | None:
        """The next job of the worker's queues (in their order), taken through the job store: popped
        and recorded as this worker's in one step, so no job is ever nowhere (RQ's BLPOP records
        nothing). Between looks it blocks on the wake lists of its queues (`keys.worker_wake`), so a
        job is taken as soon as it is put there (it looks once in burst mode: `timeout` None); every
        PRESSURE_CHECK s it checks memory (pausing while critical) and renews RQ's worker key."""
        queues = {q.name: q for q in self.queues}
        wakes = [keys.worker_wake(name) for name in queues]
        size = self.settings.batch_size()  # a batch's line starts a batch as it would join one
        names = fair_share.first_queues(
            list(queues), size, fair_share.reserved_rows(size, self.settings.batch_reserved_slots)
        )
        self.set_state(WorkerStatus.IDLE)
        self._pause_while_critical()
        idle_since = checked = time.monotonic()
        while not self.stopping:
            taken = runs.take(self.connection, self.name, names, weights=self.settings.tenant_weights)
            if taken is not None:
                return taken[0], queues[taken[1]]
            now = time.monotonic()
            if timeout is None or (max_idle_time is not None and now - idle_since >= max_idle_time):
                return None
            if now - checked >= PRESSURE_CHECK:
                checked = now
                self._pause_while_critical()
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
            self.connection.blpop(wakes, timeout=max(0.01, PRESSURE_CHECK - (time.monotonic() - checked)))
        return None

    def _pause_while_critical(self) -> None:
        # RQ's own worker key stays alive while we wait (a Redis error here takes the outage path).
        self.guard.pause_while_critical(lambda: self.stopping, self.heartbeat)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except RedisError as exc:
            self.ride_out_outage(exc)

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except RedisError as exc:
            self.ride_out_outage(exc)

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            self._execute(job, queue)
        except RedisError as exc:  # Redis went away mid-session: not the jobs' fault
            self.ride_out_outage(exc)
        except StopRequested:
            raise
        except Exception:  # a fault of the session itself: its jobs go back, each counted a retry
            log.exception("session_failed", running=sorted(self.running))
            try:
                self.hand_back_running("its worker's session failed", count_attempt=True)
            except RedisError as exc:
                self.ride_out_outage(exc)
        finally:
            self.report.session = None
            try:
                self.set_state(WorkerStatus.IDLE)
            except RedisError:
                pass  # the next wait for a job meets the outage, if it lasts

    def _execute(self, job: Job, queue: Queue) -> None:
        bound = None
        if job.func_name == keys.GENERATE_FUNC:
            try:
                bound = context.current()
            except RuntimeError as exc:  # no model is bound: the job fails, the worker goes on
                execution = rqstore.start_job(self, job, lambda _: None)
                rqstore.fail_job(self, job, queue, execution, (type(exc), exc, None))
        else:
            super().execute_job(job, queue)  # not a generation: RQ runs it as usual
        if bound is None:  # RQ settled it, knowing nothing of the running ledger
            ledger.clear_running(self.connection, job.id)
            return
        session = self.report.session = self._session(bound)
        session.run(job, queue)

    def teardown(self) -> None:
        # RQ records the end of its loop in Redis; without Redis that raised out of work() and ended
        # the process. The end is recorded once Redis answers again (`ride_out_outage`).
        try:
            super().teardown()
        except RedisError as exc:
            log.warning("worker_loop_end_not_recorded", error=str(exc))

    def _session(self, bound: WorkerContext) -> BatchSession:
        """A session on the bound model: a batch of up to the batch size, or one row at a time where
        the model cannot batch (its KV cache then lives only inside each generation)."""
        runtime = bound.runtime
        decoder = runtime.decoder(self.settings.prefill_chunk)
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

    def ride_out_outage(self, error: BaseException, loop_ended: bool = False) -> bool:
        """The outage path: Redis failed this worker (`error`; or, with `loop_ended`, whatever
        ended RQ's loop). It takes nothing new; once Redis answers again (waited for with backoff)
        it hands back every job it was running and goes on (True). False when a stop was requested
        first. `loop_ended`: RQ's loop is over, so its end is recorded too (its name can then
        register again)."""
        if isinstance(error, RedisError):
            log.warning("redis_lost", error=str(error), running=sorted(self.running))
        while self.wait_for_redis():
            try:
                if loop_ended:
                    self._record_loop_end()
                self.hand_back_running(LOST_REDIS if isinstance(error, RedisError) else LOOP_ENDED)
            except RedisError as exc:  # lost again meanwhile: wait again
                log.warning("redis_lost", error=str(exc), running=sorted(self.running))
                continue
            log.info("redis_back")
            return True
        return False

    def wait_for_redis(self) -> bool:
        """Wait, with backoff, until Redis answers (True) or a stop is requested (False)."""
        for attempt in Retrying(wait=REDIS_WAIT, retry=retry_if_exception_type(RedisError), reraise=True):
            with attempt:
                if self.stopping:
                    return False
                self.connection.ping()
        return True

    def _record_loop_end(self) -> None:
        """Record the end of RQ's last loop, which its teardown may not have done (Redis was away):
        its death, and its command channel closed (the next loop opens another; closing twice is
        harmless)."""
        self.register_death()
        self.unsubscribe()

    def hand_back_running(self, reason: str, count_attempt: bool = False) -> None:
        """Put every job the running ledger says this worker holds back on its queue (every job is
        there from its taking on, `runs.take`; one it ran that is not was settled, or handed back
        by the reaper while the worker was cut off). Not counted as the job's failure
        (`count_attempt`: counted, to the back of the queue); the one way a worker gives its jobs
        back (lost Redis, shutting down, a failed session). Raises RedisError if Redis fails
        meanwhile (what was not handed back yet stays listed)."""
        held = ledger.running(self.connection)
        retries = self.settings.job_max_retries
        for job_id in [job_id for job_id, entry in held.items() if entry.worker == self.name]:
            lifecycle.hand_back(self.connection, job_id, reason, retries, count_attempt, owner=self.name)
            self.running.pop(job_id, None)
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
        try:
            super().request_stop(signum, frame)
        except RedisError as exc:  # RQ asks Redis whether we are busy; `stopping` stops us all the same
            log.warning("stop_not_recorded", error=str(exc))

    def request_force_stop(self, signum: int, frame: Any) -> None:
        # A second signal: hand the running jobs back now instead of letting RQ fail them.
        if self._stop_signalled is not None and time.monotonic() - self._stop_signalled < SAME_STOP:
            return  # the same stop, delivered twice
        self.abandon_running_job()

    def abandon_running_job(self) -> None:
        """Hand every running job back to its queue (not counted as a failure) and exit at once, so
        RQ does not record the interrupted jobs as failed."""
        job_ids = sorted(self.running)
        try:
            try:
                self.hand_back_running("its worker shut down")
            except RedisError as exc:  # the reaper hands them back once our heartbeat lapses
                log.warning("hand_back_failed", error=str(exc), running=job_ids)
            log.warning("worker_exiting", handed_back=job_ids)
            if self.on_exit is not None:
                self.on_exit()
            lifecycle.release_own_queue(self.connection, self.name)  # its turns are routed afresh
            self.register_death()
        except RedisError as exc:  # the reaper releases what is left once our heartbeat lapses
            log.warning("worker_exit_not_recorded", error=str(exc))
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
