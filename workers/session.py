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
from shared.contract import JobRequest
from shared.jobstore import lifecycle, rqstore, runs
from shared.jobstore.events import EventBuffer
from workers import fair_share
from workers.batch import Decoder, tokens_to_prefill
from workers.cancels import CancelReader
from workers.context import WorkerContext
from workers.guard import MemoryGuard
from workers.kv_budget import KvBudget
from workers.memory import TOO_BIG_ALONE, OutOfMemory, is_out_of_memory
from workers.prefill import prefill_groups
from workers.row_intake import Holder, RowIntake, holders
from workers.run import JobRun
from workers.settling import Settler
from workers.slots import Follower, Followers, Slot, Started, read_job, request_row
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
        self._deferred: list[Slot] = []  # rows that ran out of memory beside others: join when room
        self._full = False  # a job did not fit the KV budget: take none until a row leaves
        self._beat = time.monotonic()
        self.events = EventBuffer(self.redis)  # every row's token events, one write per step
        self.settler = Settler(self.redis, worker, state)
        self.cancels = CancelReader(self.redis, self.settler)
        self._queues = {q.name: q for q in worker.queues}  # in the order they are served
        reserved = fair_share.reserved_rows(size, worker.settings.batch_reserved_slots)
        weights = worker.settings.tenant_weights
        self.intake = RowIntake(self.redis, worker.name, [*self._queues], weights, size, reserved)

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
            if not self._full:
                joining, self._deferred = joining + self._deferred, []
            joining += promoted + self._take_more()
            self._join(joining)
            joining = []
            self.events.flush()
            self._settle()
            self._step()
            self.events.flush()
            if self.held:
                self.cancels.read(self.slots, self.followers)
            self._settle()
            self._keep_alive()

    def _take_more(self) -> list[Slot]:
        """Jobs waiting in the worker's queues that may join now (workers/row_intake.py)."""
        joining: list[Slot] = []
        for job, name in self.intake.takes(self._holders, self._room):
            joining += self._admit(job, self._queues[name])
        return joining

    def _holders(self) -> list[Holder]:
        return holders(self.slots.values(), self.followers.all(), self._promoted)

    def _room(self) -> bool:
        return not self._full and not self.worker.stopping and self.guard.may_take()

    def _admit(self, job: Job, queue: Queue) -> list[Slot]:
        """Start `job` (or give it back when it does not fit the KV budget): the slot, if it joins."""
        request, prompt_ids, unreadable = read_job(job, self.bound.runtime)
        worst = len(prompt_ids) + (request.max_tokens or 1) if request and prompt_ids is not None else 0
        lengths = [tokens for s in self.slots.values() for tokens in s.row.worst_cases()]
        record = lifecycle.read(job)
        if not self.intake.fits(self.budget, lengths, worst, request, line := Holder.of(record).line):
            runs.give_back(self.redis, job, queue.name)
            self._full = self._full or not line
            log.info("batch_full", job_id=job.id, rows=len(self.slots), kv_budget=self.budget.budget)
            return []
        run = JobRun(job, record, self.bound, self.events)
        with run.logging():
            started = self._start(job, queue, run)
            if started is None:
                return []
            run.begin(request)
            if request is None or prompt_ids is None:
                assert unreadable is not None
                self.settler.fail(
                    started, (type(unreadable), unreadable, unreadable.__traceback__), recorded=False
                )
                return []
            if (cached := run.cached()) is not None:  # an identical request finished meanwhile
                self.settler.answer(started, cached, "cache")
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
                execution = runs.start(self.redis, self.worker, job, run.record, queue.name)
                run.fenced(run.record.attempt)
                return Started(job, queue, execution, run, time.monotonic())
            kind, error = refusal
            refused = runs.refuse(self.redis, self.worker, job, run.record, kind, error.code, error.message)
            execution, token = refused
            run.fenced(token)
        self.settler.fail(
            Started(job, queue, execution, run, time.monotonic()), (type(error), error, None), recorded=True
        )
        return None

    def _slot(self, started: Started, request: JobRequest, prompt_ids: list[int]) -> Slot | None:
        """The row of a started job, in its slot (None when it could not be made: the job failed)."""
        run = started.run
        with run.logging():
            try:
                runtime = self.bound.runtime
                completion = runtime.completion(request, run.first_token, run.stream.text, prompt_ids)
            except Exception:
                self.settler.fail(started, sys.exc_info(), recorded=False)
                return None
            session = prefix = None
            if self.turns is not None and request.session_id:
                session = self.turns.key(run.record.tenant_or_default, request.session_id)
                with run.tracing():
                    prefix = self.turns.reuse(session, completion.prompt_ids)
            completion.cached_tokens = prefix.length if prefix is not None else 0
        row = request_row(
            started.job.id, self.bound.runtime, request, completion, self.decoder.device, prefix
        )
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
        """Take an ended session turn's keys and values out of the batch, to keep for its next turn
        once the job is settled (a run that was replaced keeps nothing)."""
        request, turns = slot.row.request, self.turns
        if slot.session is None or turns is None or request is None or request.session_id is None:
            return
        tenant, key, session_id = slot.run.record.tenant_or_default, slot.session, request.session_id
        state = self.decoder.row_state(slot.job.id)
        slot.keep = lambda: turns.keep(key, tenant, session_id, state)

    def _join(self, joining: list[Slot]) -> None:
        """Prefill the joining rows, shortest first, in groups of similar length (workers/prefill.py),
        each group's first tokens sent before the next group's prefill."""
        groups = prefill_groups(joining, [tokens_to_prefill(s.row) for s in joining])
        for index, group in enumerate(groups):
            if index:
                self.events.flush()
            self._join_group(group)

    def _join_group(self, joining: list[Slot]) -> None:
        """Prefill the joining rows together. When that fails, one row may be the cause (its sampler,
        its prompt): each row not in yet is prefilled alone, and only a row that fails alone fails."""
        try:
            self.decoder.join([s.row for s in joining])
            return
        except RedisError:
            raise
        except Exception as exc:
            self._after_failure(exc)
            if len(joining) == 1:
                self._join_failed(joining[0], exc)
                return
            log.warning("batch_prefill_failed", rows=len(joining), error=type(exc).__name__)
        joined = {r.key for r in self.decoder.rows}
        for slot in joining:
            if slot.job.id not in joined:
                self._join_alone(slot)

    def _step(self) -> None:
        """One decode step of every row. When it fails, the batch's cache is not to be trusted and one
        row may be the cause: every row leaves and joins again alone, prefilled with the tokens it
        has (which gives it the step's token), so only a row that fails alone fails."""
        if not len(self.decoder):  # no row decoding or prefilling
            return
        try:
            self.decoder.step()
            return
        except RedisError:
            raise
        except Exception as exc:
            info = sys.exc_info()
            rows = self.decoder.drop({r.key for r in self.decoder.rows})
            log.warning("batch_step_failed", rows=len(rows), error=type(exc).__name__)
            self._after_failure(exc)
        keys = list(dict.fromkeys(r.key for r in rows))  # a request's choices share its key
        if len(keys) == 1:
            self._fail_row(self.slots[keys[0]], info)
            return
        for key in keys:
            self._join_alone(self.slots[key])

    def _join_alone(self, slot: Slot) -> None:
        """Prefill `slot`'s row on its own; the job fails if even that fails."""
        try:
            self.decoder.join([slot.row])
        except RedisError:
            raise
        except Exception as exc:
            self._join_failed(slot, exc)

    def _join_failed(self, slot: Slot, error: Exception) -> None:
        """`slot`'s row failed to join on its own. Out of memory beside other rows, it waits in the
        session until a row leaves (it may fit then); any other error, or out of memory in an empty
        batch, fails its job."""
        if is_out_of_memory(error) and len(self.decoder):
            self.decoder.drop({slot.job.id})
            self._deferred.append(slot)
            log.warning("row_deferred_out_of_memory", job_id=slot.job.id, rows=len(self.decoder))
            return
        if is_out_of_memory(error):
            error = OutOfMemory(TOO_BIG_ALONE)
        self._fail_row(slot, (type(error), error, error.__traceback__))

    def _after_failure(self, error: Exception) -> None:
        """Out of memory: what can be given back is, and no job is taken until a row leaves."""
        if is_out_of_memory(error):
            self.guard.out_of_memory()
            self._full = True

    def _fail_row(self, slot: Slot, exc_info: Any) -> None:
        """`slot`'s row failed on its own: out of the batch, its job failed with `exc_info`."""
        self.decoder.drop({slot.job.id})
        self._end(slot, exc_info)

    def _settle(self) -> None:
        """Finish every job whose row ended, was cancelled, failed or ran out of time."""
        ended: set[str] = set()
        now = time.monotonic()
        for key, slot in self.slots.items():
            timeout = slot.job.timeout
            if slot.run.superseded:
                ended.add(key)
            elif slot.row.ended or slot.row.error is not None or slot.run.cancel.cancelled:
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
            if slot.row.error is None and not slot.run.cancel.cancelled and not slot.run.superseded:
                self._keep_session(slot)
        self.decoder.drop(ended)
        self._full = self.intake.lines_full = False
        for key in ended:
            slot = self.slots[key]
            if slot.run.superseded:
                self._end(slot, None)
                continue
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
                    self.settler.answer(f, result, "identical")
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
        if run.superseded:
            self.settler.drop(slot)
            return None
        with run.logging():
            if exc_info is not None:
                self.settler.fail(slot, exc_info, recorded=False)
                return None
            try:
                # A cancel read after the row ended on its own comes too late to stop anything.
                generation = completion.result(cancelled=run.cancel.cancelled and not completion.ended)
                result = run.finish(generation, [s.completion.result() for s in slot.row.siblings])
            except RedisError:
                raise
            except Exception:  # cancelled (JobCancelled, recorded by finish) or a failure to record
                self.settler.fail(slot, sys.exc_info(), recorded=True)
                return None
            if not self.settler.finish(slot, result, keep=slot.keep):
                return None
            return result

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if now - self._beat >= RQ_HEARTBEAT_EVERY:
            self._beat = now
            jobs = [s.job for s in self.slots.values()] + [f.job for f in self.followers.all()]
            rqstore.keep_alive(self.worker, jobs)
