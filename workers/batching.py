"""A worker's batch session: while it has jobs, it takes more from its queues as long as it has
room (slots, KV budget, memory), decodes them all in one loop, and settles each job on its own in
RQ as it ends. It starts when the worker's RQ loop hands it a job and returns when none is left."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import RedisError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException

from shared.affinity import mark_decoding, remember_worker, unmark_decoding
from shared.cancellation import CANCEL_POLL, cancels_requested
from shared.contract import JobRequest
from shared.keys import DEFAULT_TENANT
from shared.stages import META_TENANT
from workers import rq_lifecycle
from workers.batch import DecodeBatch, Row
from workers.jobs import JobRun
from workers.kv_budget import KvBudget
from workers.sampling import sampler_for
from workers.sessions import SessionPrefix, session_key
from workers.stream import EventBuffer

if TYPE_CHECKING:
    from workers.context import WorkerContext
    from workers.worker import GenerationWorker

log = structlog.get_logger()

RQ_HEARTBEAT_EVERY = 15.0
"""Seconds between renewals of the worker's RQ key while a session runs."""


@dataclass
class Slot:
    """One job of the batch: its RQ records, its run and its row."""

    job: Job
    queue: Queue
    execution: Execution
    run: JobRun
    row: Row
    began: float
    session: str | None = None
    """Its tenant's session (see workers/sessions.py), whose cache it leaves when it ends."""


@dataclass
class Follower:
    """A started job that decodes nothing: identical to one the batch is decoding (the same
    response-cache fingerprint), it takes that job's result when it finishes; should that job fail
    or be cancelled, it decodes itself. (A job answered from the cache as it starts passes through
    one too.)"""

    job: Job
    queue: Queue
    execution: Execution
    run: JobRun
    request: JobRequest
    began: float


class BatchSession:
    """Jobs decoded together until none is left (see the module docstring)."""

    def __init__(self, worker: GenerationWorker, bound: WorkerContext, size: int, budget: KvBudget):
        self.worker, self.bound, self.size, self.budget = worker, bound, size, budget
        self.batch: DecodeBatch = bound.runtime.new_batch()
        self.slots: dict[str, Slot] = {}
        self.followers: dict[str, list[Follower]] = {}  # by the fingerprint they wait on
        self._promoted: list[Slot] = []  # followers whose leader failed: they join as rows
        self._full = False  # a job did not fit the KV budget: take none until a row leaves
        self._beat = self._cancels_read = time.monotonic()
        self.events = EventBuffer(worker.connection)  # every row's token events, one write per step

    @property
    def kv_bytes(self) -> int:
        """Bytes the batch's KV cache holds now."""
        return len(self.batch) * self.batch.length * self.budget.bytes_per_token

    @property
    def held(self) -> int:
        """Jobs the session holds: its rows, their followers and the followers about to decode
        themselves (each takes a place of the size)."""
        return len(self.slots) + len(self._waiting()) + len(self._promoted)

    def run(self, job: Job, queue: Queue) -> None:
        """Serve `job` and every job that arrives while the batch is not empty."""
        joining = self._admit(job, queue)
        while joining or self.slots or self._promoted:
            promoted, self._promoted = self._promoted, []
            for slot in promoted:
                self._register(slot)
            joining += promoted + self._take_more()
            self._join(joining)
            joining = []
            self.events.flush()
            self._settle()
            self._step()
            self.events.flush()
            self._read_cancels()
            self._settle()
            self._keep_alive()

    def _take_more(self) -> list[Slot]:
        """Jobs waiting in the worker's queues, while there is room and the worker may take them."""
        joining: list[Slot] = []
        if self.held >= self.size or self._full or not rq_lifecycle.jobs_waiting(self.worker):
            return joining
        while (
            self.held < self.size and not self._full and not self.worker.stopping and self.worker.may_take()
        ):
            taken = rq_lifecycle.take_job(self.worker)
            if taken is None:
                break
            joining += self._admit(*taken)
        return joining

    def _admit(self, job: Job, queue: Queue) -> list[Slot]:
        """Start `job` (or give it back when it does not fit the KV budget): the slot, if it joins."""
        worst = self._worst_case(job)
        lengths = [s.row.completion.worst_case_tokens for s in self.slots.values()]
        if not self.budget.admits(lengths, worst):
            rq_lifecycle.return_job(job, queue)
            self._full = True
            log.info("batch_full", job_id=job.id, rows=len(lengths), kv_budget=self.budget.budget)
            return []
        self.worker.job_began(job, queue)
        run = JobRun(job, self.bound, self.events)
        with run.logging(), run.tracing():  # RQ's own lines about the job carry its ids and trace
            execution = rq_lifecycle.start_job(self.worker, job)
        with run.logging():
            try:
                request = run.begin(job.args[0])
            except RedisError:
                raise  # Redis is away: the session ends, the worker hands its jobs back
            except Exception:  # cancelled, expired or invalid: begin recorded why
                self._fail(job, queue, execution, run, sys.exc_info(), recorded=True)
                return []
            if (cached := run.cached()) is not None:  # an identical request finished meanwhile
                self._answer(Follower(job, queue, execution, run, request, time.monotonic()), cached, "cache")
                return []
            if (fingerprint := run.fingerprint) is not None and self._decoding(fingerprint):
                follower = Follower(job, queue, execution, run, request, time.monotonic())
                self.followers.setdefault(fingerprint, []).append(follower)
                log.info("following_identical_request")
                return []
            slot = self._slot(job, queue, execution, run, request, time.monotonic())
        if slot is None:
            return []
        self._register(slot)
        return [slot]

    def _slot(
        self, job: Job, queue: Queue, execution: Execution, run: JobRun, request: JobRequest, began: float
    ) -> Slot | None:
        """The row of a started job, in its slot (None when its prompt cannot be read: it failed)."""
        with run.logging():
            try:
                completion = self.bound.runtime.completion(request, run.first_token, run.stream.text)
            except RedisError:
                raise
            except Exception:
                self._fail(job, queue, execution, run, sys.exc_info(), recorded=False)
                return None
            session = (
                session_key(job.meta.get(META_TENANT) or DEFAULT_TENANT, request.session_id)
                if request.session_id
                else None
            )
            with run.tracing():
                prefix = self._reuse(session, completion.prompt_ids)
            completion.cached_tokens = prefix.length if prefix is not None else 0
        row = Row(job.id, completion, sampler_for(request, self.batch.device), prefix=prefix)
        return Slot(job, queue, execution, run, row, began, session)

    def _register(self, slot: Slot) -> None:
        """`slot` decodes in the batch; a cacheable one is marked as decoding by this worker, so the
        scheduler sends identical requests here to follow it (a lost mark only costs that)."""
        self.slots[slot.job.id] = slot
        if (fingerprint := slot.run.fingerprint) is not None:
            try:
                mark_decoding(self.worker.connection, fingerprint, self.worker.name, slot.job.timeout or 600)
            except RedisError as exc:
                log.warning("decoding_mark_failed", error=str(exc))

    def _decoding(self, fingerprint: str) -> bool:
        """Whether a row of the batch is decoding the request of `fingerprint`."""
        return any(s.run.fingerprint == fingerprint for s in self.slots.values())

    def _reuse(self, session: str | None, prompt_ids: list[int]) -> SessionPrefix | None:
        """The cached start of a session turn's prompt on this worker, if any (counted and logged)."""
        store = self.worker.session_store()
        if session is None or store is None:
            return None
        prefix = store.take(session, prompt_ids)
        metrics, model = self.bound.metrics, self.bound.runtime.spec.name
        if metrics is not None:
            (metrics.session_hits if prefix is not None else metrics.session_misses).labels(model).inc()
            if prefix is not None:
                metrics.prefix_tokens_reused.labels(model).inc(prefix.length)
        reused = prefix.length if prefix is not None else 0
        log.info(
            "session_hit" if prefix else "session_miss", prefix_tokens=reused, prompt_tokens=len(prompt_ids)
        )
        return prefix

    def _keep_session(self, slot: Slot) -> None:
        """Keep an ended session turn's keys and values for its next turn, and tell the scheduler
        this worker holds them."""
        store = self.worker.session_store()
        if slot.session is None or store is None:
            return
        state = self.batch.row_state(slot.job.id)
        if state is None or not store.put(slot.session, *state):
            return
        request = slot.run.request
        assert request is not None and request.session_id is not None
        tenant = slot.job.meta.get(META_TENANT) or DEFAULT_TENANT
        remember_worker(
            self.worker.connection,
            tenant,
            request.session_id,
            self.worker.name,
            self.worker.settings.session_ttl,
        )

    def _worst_case(self, job: Job) -> int:
        """Prompt + max_tokens of `job` (0 when it cannot be read: it joins, and fails on its own)."""
        try:
            request = JobRequest.model_validate(job.args[0])
            return self.bound.runtime.prompt_length(request) + (request.max_tokens or 1)
        except Exception:
            return 0

    def _join(self, joining: list[Slot]) -> None:
        if not joining:
            return
        try:
            self.batch.join([s.row for s in joining])
        except Exception:  # the prefill failed: those jobs fail, the batch goes on without them
            info = sys.exc_info()
            for slot in joining:
                self.batch.drop({slot.job.id})
                self._end(slot, info)

    def _step(self) -> None:
        if not self.batch.rows:
            return
        try:
            self.batch.step()
        except Exception:  # a failed decode step leaves no row usable
            info = sys.exc_info()
            for slot in list(self.slots.values()):
                self.batch.drop({slot.job.id})
                self._end(slot, info)

    def _settle(self) -> None:
        """Finish every job whose row ended, was cancelled, failed or ran out of time."""
        ended: set[str] = set()
        now = time.monotonic()
        for key, slot in self.slots.items():
            timeout = slot.job.timeout
            if slot.row.completion.ended or slot.row.error is not None or slot.run.cancel.cancelled:
                ended.add(key)
            elif timeout is not None and timeout > 0 and now - slot.began > timeout:
                slot.row.error = JobTimeoutException(
                    f"Job exceeded maximum timeout value ({timeout} seconds)"
                )
                ended.add(key)
        if not ended:
            return
        for key in ended:
            slot = self.slots[key]
            if slot.row.error is None and not slot.run.cancel.cancelled:
                self._keep_session(slot)
        self.batch.drop(ended)
        self._full = False
        for key in ended:
            slot = self.slots[key]
            if isinstance(slot.row.error, RedisError):
                # Not the job's fault: end the session; the worker hands every running job back.
                raise slot.row.error
            if slot.row.error is not None:
                error = slot.row.error
                self._end(slot, (type(error), error, error.__traceback__))
            else:
                self._end(slot, None)

    def _end(self, slot: Slot, exc_info: Any) -> None:
        """Settle one job in RQ: its result, or its failure; then the jobs that followed it."""
        self.slots.pop(slot.job.id, None)
        fingerprint = slot.run.fingerprint
        followers = self.followers.pop(fingerprint, []) if fingerprint is not None else []
        if fingerprint is not None and not self._decoding(fingerprint):
            try:
                unmark_decoding(self.worker.connection, fingerprint, self.worker.name)
            except RedisError as exc:  # the mark expires with the job's timeout
                log.warning("decoding_mark_failed", error=str(exc))
        result = self._settle_row(slot, exc_info)
        if result is not None:
            for f in followers:
                with f.run.logging():
                    self._answer(f, result, "identical")
        else:
            for f in followers:  # none to take: each decodes itself
                with f.run.logging():
                    log.info("leader_ended_without_result")
                promoted = self._slot(f.job, f.queue, f.execution, f.run, f.request, f.began)
                if promoted is not None:
                    self._promoted.append(promoted)

    def _settle_row(self, slot: Slot, exc_info: Any) -> dict[str, Any] | None:
        """Settle `slot`'s job in RQ: its result (returned), or its failure (None)."""
        job, queue, run = slot.job, slot.queue, slot.run
        with run.logging():
            if exc_info is None:
                try:
                    generation = slot.row.completion.result(cancelled=run.cancel.cancelled)
                    result = run.finish(generation)
                except RedisError:
                    raise
                except Exception:  # cancelled (JobCancelled, recorded by finish) or a failure to record
                    self._fail(job, queue, slot.execution, run, sys.exc_info(), recorded=True)
                    return None
                with run.tracing():
                    rq_lifecycle.finish_job(self.worker, job, queue, slot.execution, result)
                self.worker.job_ended(job, time.monotonic() - slot.began)
                return result
            self._fail(job, queue, slot.execution, run, exc_info, recorded=False)
            return None

    def _answer(self, f: Follower, cached: dict[str, Any], source: str) -> None:
        """Finish a started job with a result it did not generate (`source`: "cache", or
        "identical": its leader's), as a cache hit."""
        try:
            answer = f.run.finish_cached(cached, source)
        except RedisError:
            raise
        except Exception:
            self._fail(f.job, f.queue, f.execution, f.run, sys.exc_info(), recorded=False)
            return
        with f.run.tracing():
            rq_lifecycle.finish_job(self.worker, f.job, f.queue, f.execution, answer)
        self.worker.job_ended(f.job, time.monotonic() - f.began)

    def _fail(
        self, job: Job, queue: Queue, execution: Execution, run: JobRun, exc_info: Any, recorded: bool
    ) -> None:
        if not recorded:
            run.fail(exc_info[1])
        with run.logging(), run.tracing():
            rq_lifecycle.fail_job(self.worker, job, queue, execution, exc_info)
        self.worker.job_ended(job, 0.0)

    def _read_cancels(self) -> None:
        """Mark the rows a client cancelled: every row's flag in one read, at most every CANCEL_POLL s."""
        now = time.monotonic()
        if now - self._cancels_read < CANCEL_POLL or not self.held:
            return
        self._cancels_read = now
        waiting = {f.job.id: f for f in self._waiting()}
        try:
            cancelled = cancels_requested(self.worker.connection, [*self.slots, *waiting])
        except RedisError:  # a lost read must not fail the batch; the next one reads again
            return
        for job_id in cancelled:
            if job_id in self.slots:
                self.slots[job_id].run.cancel.cancelled = True
            elif (f := waiting.get(job_id)) is not None:  # ends at once: it decodes nothing
                self.followers[f.run.fingerprint or ""].remove(f)
                with f.run.logging():
                    try:
                        f.run.cancel_waiting()
                    except RedisError:
                        raise
                    except Exception:
                        self._fail(f.job, f.queue, f.execution, f.run, sys.exc_info(), recorded=True)

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if now - self._beat >= RQ_HEARTBEAT_EVERY:
            self._beat = now
            jobs = [s.job for s in self.slots.values()] + [f.job for f in self._waiting()]
            rq_lifecycle.keep_alive(self.worker, jobs)

    def _waiting(self) -> list[Follower]:
        """Every follower, whatever it waits on."""
        return [f for group in self.followers.values() for f in group]
