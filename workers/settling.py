"""Settling a session's jobs: each result or failure is committed by the job store only while the
job's run holds its fence (shared/jobstore/runs.settle); then the cache, the webhook and the
bookkeeping follow. A run whose job was handed back meanwhile is dropped without a write."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.worker import BaseWorker

from shared.drain import record_done
from shared.jobstore import runs
from workers.slots import Started
from workers.state import WorkerState

log = structlog.get_logger()


class Settler:
    """Ends a session's started jobs: with a result, with a failure, or dropped (replaced)."""

    def __init__(self, redis: Redis, worker: BaseWorker, state: WorkerState):
        self.redis, self.worker, self.state = redis, worker, state

    def answer(self, started: Started, cached: dict[str, Any], source: str) -> None:
        """Finish a started job with a result it did not generate (`source`: "cache", or
        "identical": its leader's), as a cache hit."""
        try:
            answer = started.run.finish_cached(cached)
        except RedisError:
            raise
        except Exception:
            self.fail(started, sys.exc_info(), recorded=False)
            return
        self.finish(started, answer, source)

    def finish(
        self,
        started: Started,
        result: dict[str, Any],
        source: str | None = None,
        keep: Callable[[], None] | None = None,
    ) -> bool:
        """Settle the job with `result`: RQ's result, its record and its `done` event in one
        transaction, only while its run holds the job's fence; then its cache, webhook and log."""
        run = started.run
        event, data = runs.done_event(result, run.record)
        assert run.fence is not None  # taken as the run started
        ending, held = run.stream.ending(event, data), (started.job, started.queue, started.execution)
        with run.tracing():
            webhook = run.webhook("finished", result)
            settled = runs.settle(
                self.redis, self.worker, held, run.record, run.fence, ending, result=result, webhook=webhook
            )
        if settled == "superseded":
            self.drop(started)
            return False
        run.finished(result, source)
        if keep is not None:
            keep()  # a session turn's KV cache, for its next turn
        self._ended(started.job, time.monotonic() - started.began, result)
        return True

    def fail(self, started: Started, exc_info: Any, recorded: bool) -> None:
        """Settle the job as failed with `exc_info` (its record says why first, unless `recorded`):
        RQ's failure, its record and its `error` event in one transaction, only while its run holds
        the job's fence; then its webhook."""
        run = started.run
        if not recorded:
            run.fail(exc_info[1])
        if run.record.cancelled is not None or run.record.expired is not None:
            exc_info = (exc_info[0], exc_info[1], None)  # an ending the client chose: no traceback
        event, data = runs.error_event(run.record)
        assert run.fence is not None  # taken as the run started (or was refused)
        ending, held = run.stream.ending(event, data), (started.job, started.queue, started.execution)
        with run.logging(), run.tracing():
            webhook = run.webhook("failed")
            settled = runs.settle(
                self.redis,
                self.worker,
                held,
                run.record,
                run.fence,
                ending,
                exc_info=exc_info,
                webhook=webhook,
            )
        if settled == "superseded":
            self.drop(started)
            return
        run.failed()
        self._ended(started.job, 0.0)

    def drop(self, started: Started) -> None:
        """A run whose job was handed back (this worker was paused or cut off, and the reaper gave
        the job to another run): it writes nothing more; its row leaves the session."""
        with started.run.logging():
            log.warning("attempt_superseded", attempt=started.run.record.attempt)
        self.state.ended(started.job.id, 0.0, None)

    def _ended(self, job: Job, seconds: float, result: dict[str, Any] | None = None) -> None:
        """Bookkeeping as a job ends: counted as drained and done (its settling left the ledger)."""
        try:
            record_done(self.redis, job.id)
        except RedisError as exc:  # bookkeeping only; the job itself is settled
            log.warning("drain_not_recorded", error=str(exc))
        tokens = result.get("usage", {}).get("completion_tokens", 0) if result is not None else None
        self.state.ended(job.id, seconds, tokens)
