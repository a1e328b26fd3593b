"""A worker's session, the one way its generation jobs run. It starts when the worker's RQ loop hands it
a job; while it has jobs, it takes more from the worker's queues as long as it has room (slots, KV
budget, memory), decodes them all in one loop, and settles each job on its own, in its record and in
RQ, as it ends; it returns when none is left. Its rows decode in one batch, or one at a time where
the model cannot batch (workers/serial.py): a job alone is a batch of one."""

from __future__ import annotations

import sys
import time
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.worker import BaseWorker

from shared.affinity import mark_decoding, unmark_decoding
from shared.cancellation import CANCEL_POLL, cancels_requested
from shared.contract import JobRequest
from shared.drain import record_done
from shared.jobstore import ledger, lifecycle, rqstore
from shared.jobstore.events import EventBuffer
from workers.batch import Decoder, Row
from workers.context import WorkerContext
from workers.guard import MemoryGuard
from workers.kv_budget import KvBudget
from workers.run import JobRun
from workers.sampling import sampler_for
from workers.slots import Follower, Followers, Slot, Started
from workers.state import WorkerState
from workers.turns import SessionTurns

log = structlog.get_logger()

RQ_HEARTBEAT_EVERY = 15.0
"""Seconds between renewals of the worker's RQ key while a session runs."""


class BatchSession:
    """Jobs decoded together until none is left (see the module docstring)."""

    def __init__(
        self,
        worker: BaseWorker,
        bound: WorkerContext,
        decoder: Decoder,
        size: int,
        budget: KvBudget,
        state: WorkerState,
        guard: MemoryGuard,
        turns: SessionTurns | None = None,
    ):
        self.worker, self.bound, self.decoder, self.size, self.budget = worker, bound, decoder, size, budget
        self.state, self.guard, self.turns = state, guard, turns
        self.redis: Redis = worker.connection
        self.slots: dict[str, Slot] = {}
        self.followers = Followers()
        self._promoted: list[Slot] = []  # followers whose leader failed: they join as rows
        self._full = False  # a job did not fit the KV budget: take none until a row leaves
        self._beat = self._cancels_read = time.monotonic()
        self.events = EventBuffer(self.redis)  # every row's token events, one write per step

    @property
    def kv_bytes(self) -> int:
        """Bytes the batch's KV cache holds now."""
        return len(self.decoder) * self.decoder.length * self.budget.bytes_per_token

    @property
    def held(self) -> int:
        """Jobs the session holds: its rows, their followers and the followers about to decode
        themselves (each takes a place of the size)."""
        return len(self.slots) + len(self.followers) + len(self._promoted)

    def run(self, job: Job, queue: Queue) -> None:
        """Serve `job` and every job that arrives while the session is not empty."""
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
        if self.held >= self.size or self._full or not rqstore.jobs_waiting(self.worker):
            return joining
        while (
            self.held < self.size
            and not self._full
            and not rqstore.stop_requested(self.worker)
            and self.guard.may_take()
        ):
            taken = rqstore.take_job(self.worker)
            if taken is None:
                break
            joining += self._admit(*taken)
        return joining

    def _admit(self, job: Job, queue: Queue) -> list[Slot]:
        """Start `job` (or give it back when it does not fit the KV budget): the slot, if it joins."""
        request, prompt_ids, unreadable = self._read(job)
        worst = len(prompt_ids) + (request.max_tokens or 1) if request and prompt_ids is not None else 0
        lengths = [s.row.completion.worst_case_tokens for s in self.slots.values()]
        if not self.budget.admits(lengths, worst):
            rqstore.return_job(job, queue)
            self._full = True
            log.info("batch_full", job_id=job.id, rows=len(lengths), kv_budget=self.budget.budget)
            return []
        run = JobRun(job, lifecycle.read(job), self.bound, self.events)
        with run.logging():
            started = self._start(job, queue, run)
            if started is None:
                return []
            run.begin(request)
            if request is None or prompt_ids is None:
                assert unreadable is not None
                self._fail(started, (type(unreadable), unreadable, unreadable.__traceback__), recorded=False)
                return []
            if (cached := run.cached()) is not None:  # an identical request finished meanwhile
                self._answer(started, cached, "cache")
                return []
            if (fingerprint := run.fingerprint) is not None and self._decoding(fingerprint):
                follower = Follower(job, queue, started.execution, run, started.began, request, prompt_ids)
                self.followers.add(fingerprint, follower)
                log.info("following_identical_request")
                return []
            slot = self._slot(started, request, prompt_ids)
        if slot is None:
            return []
        self._register(slot)
        return [slot]

    def _start(self, job: Job, queue: Queue, run: JobRun) -> Started | None:
        """Start `job` in its record and in RQ; None when it was refused instead (cancelled or past
        its deadline on its way here: it never runs, and fails in RQ with the reason)."""
        self.state.began(job.id, queue.name)
        with run.tracing():  # RQ's own lines about the job carry its ids and trace
            refusal = run.refusal()
            if refusal is None:
                execution = lifecycle.start(self.redis, self.worker, job, run.record, queue.name)
                return Started(job, queue, execution, run, time.monotonic())
            kind, error = refusal
            execution = lifecycle.refuse(
                self.redis, self.worker, job, run.record, kind, error.code, error.message
            )
            run.refused(kind, error)
        self._fail(
            Started(job, queue, execution, run, time.monotonic()), (type(error), error, None), recorded=True
        )
        return None

    def _read(self, job: Job) -> tuple[JobRequest | None, list[int] | None, Exception | None]:
        """The job's request and its prompt's token ids (rendered once, here), or why it cannot run:
        it still starts, and fails at once."""
        try:
            request = JobRequest.model_validate(job.args[0])
        except Exception as exc:
            return None, None, exc
        try:
            return request, self.bound.runtime.prompt_ids(request), None
        except Exception as exc:
            return request, None, exc

    def _slot(self, started: Started, request: JobRequest, prompt_ids: list[int]) -> Slot | None:
        """The row of a started job, in its slot (None when it could not be made: the job failed)."""
        run = started.run
        with run.logging():
            try:
                runtime = self.bound.runtime
                completion = runtime.completion(request, run.first_token, run.stream.text, prompt_ids)
            except Exception:
                self._fail(started, sys.exc_info(), recorded=False)
                return None
            session = prefix = None
            if self.turns is not None and request.session_id:
                session = self.turns.key(run.record.tenant_or_default, request.session_id)
                with run.tracing():
                    prefix = self.turns.reuse(session, completion.prompt_ids)
            completion.cached_tokens = prefix.length if prefix is not None else 0
        sampler = sampler_for(request, self.decoder.device)
        row = Row(started.job.id, completion, sampler, prefix=prefix, request=request)
        return Slot(started.job, started.queue, started.execution, run, started.began, row, session)

    def _register(self, slot: Slot) -> None:
        """`slot` decodes in the session; a cacheable one is marked as decoding by this worker, so the
        scheduler sends identical requests here to follow it (a lost mark only costs that)."""
        self.slots[slot.job.id] = slot
        if (fingerprint := slot.run.fingerprint) is not None:
            try:
                mark_decoding(self.redis, fingerprint, self.worker.name, int(slot.job.timeout or 600))
            except RedisError as exc:
                log.warning("decoding_mark_failed", error=str(exc))

    def _decoding(self, fingerprint: str) -> bool:
        """Whether a row of the session is decoding the request of `fingerprint`."""
        return any(s.run.fingerprint == fingerprint for s in self.slots.values())

    def _keep_session(self, slot: Slot) -> None:
        """Leave an ended session turn's keys and values for its next turn."""
        request = slot.row.request
        if slot.session is None or self.turns is None or request is None or request.session_id is None:
            return
        tenant = slot.run.record.tenant_or_default
        self.turns.keep(slot.session, tenant, request.session_id, self.decoder.row_state(slot.job.id))

    def _join(self, joining: list[Slot]) -> None:
        if not joining:
            return
        try:
            self.decoder.join([s.row for s in joining])
        except Exception:  # the prefill failed: those jobs fail, the session goes on without them
            info = sys.exc_info()
            for slot in joining:
                self.decoder.drop({slot.job.id})
                self._end(slot, info)

    def _step(self) -> None:
        if not self.decoder.rows:
            return
        try:
            self.decoder.step()
        except Exception:  # a failed decode step leaves no row usable
            info = sys.exc_info()
            for slot in list(self.slots.values()):
                self.decoder.drop({slot.job.id})
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
        self.decoder.drop(ended)
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
        """Settle one job: its result, or its failure; then the jobs that followed it."""
        self.slots.pop(slot.job.id, None)
        fingerprint = slot.run.fingerprint
        followers = self.followers.take(fingerprint) if fingerprint is not None else []
        if fingerprint is not None and not self._decoding(fingerprint):
            try:
                unmark_decoding(self.redis, fingerprint, self.worker.name)
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
                promoted = self._slot(f, f.request, f.prompt_ids)
                if promoted is not None:
                    self._promoted.append(promoted)

    def _settle_row(self, slot: Slot, exc_info: Any) -> dict[str, Any] | None:
        """Settle `slot`'s job: its result (returned), or its failure (None)."""
        run, completion = slot.run, slot.row.completion
        with run.logging():
            if exc_info is not None:
                self._fail(slot, exc_info, recorded=False)
                return None
            try:
                # A cancel read after the row ended on its own comes too late to stop anything.
                generation = completion.result(cancelled=run.cancel.cancelled and not completion.ended)
                result = run.finish(generation)
            except RedisError:
                raise
            except Exception:  # cancelled (JobCancelled, recorded by finish) or a failure to record
                self._fail(slot, sys.exc_info(), recorded=True)
                return None
            self._finish(slot, result)
            return result

    def _answer(self, started: Started, cached: dict[str, Any], source: str) -> None:
        """Finish a started job with a result it did not generate (`source`: "cache", or
        "identical": its leader's), as a cache hit."""
        try:
            answer = started.run.finish_cached(cached, source)
        except RedisError:
            raise
        except Exception:
            self._fail(started, sys.exc_info(), recorded=False)
            return
        self._finish(started, answer)

    def _finish(self, started: Started, result: dict[str, Any]) -> None:
        """Store `result` as the job's, as RQ stores a job function's return value."""
        with started.run.tracing():
            rqstore.finish_job(self.worker, started.job, started.queue, started.execution, result)
        self._ended(started.job, time.monotonic() - started.began, result)

    def _fail(self, started: Started, exc_info: Any, recorded: bool) -> None:
        """Fail the job in RQ with `exc_info` (its record says why first, unless `recorded`)."""
        if not recorded:
            started.run.fail(exc_info[1])
        with started.run.logging(), started.run.tracing():
            rqstore.fail_job(self.worker, started.job, started.queue, started.execution, exc_info)
        self._ended(started.job, 0.0)

    def _ended(self, job: Job, seconds: float, result: dict[str, Any] | None = None) -> None:
        """Bookkeeping as a job ends: out of the running ledger, counted as drained and done."""
        ledger.clear_running(self.redis, job.id)
        try:
            record_done(self.redis, job.id)
        except RedisError as exc:  # bookkeeping only; the job itself is settled
            log.warning("drain_not_recorded", error=str(exc))
        tokens = result.get("usage", {}).get("completion_tokens", 0) if result is not None else None
        self.state.ended(job.id, seconds, tokens)

    def _read_cancels(self) -> None:
        """Mark the rows a client cancelled: every row's flag in one read, at most every CANCEL_POLL s."""
        now = time.monotonic()
        if now - self._cancels_read < CANCEL_POLL or not self.held:
            return
        self._cancels_read = now
        waiting = {f.job.id: f for f in self.followers.all()}
        try:
            cancelled = cancels_requested(self.redis, [*self.slots, *waiting])
        except RedisError:  # a lost read must not fail the session; the next one reads again
            return
        for job_id in cancelled:
            if job_id in self.slots:
                self.slots[job_id].run.cancel.cancelled = True
            elif (f := waiting.get(job_id)) is not None:  # ends at once: it decodes nothing
                self.followers.remove(f.run.fingerprint or "", f)
                with f.run.logging():
                    try:
                        f.run.cancel_waiting()
                    except RedisError:
                        raise
                    except Exception:
                        self._fail(f, sys.exc_info(), recorded=True)

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if now - self._beat >= RQ_HEARTBEAT_EVERY:
            self._beat = now
            jobs = [s.job for s in self.slots.values()] + [f.job for f in self.followers.all()]
            rqstore.keep_alive(self.worker, jobs)
