"""The batch feeder: a thread of the scheduler process that turns the lines of running batches into
jobs a few at a time (`shared.batches.release`), writes each line's output or error as its job ends
(`shared.batches.ledger`: exactly once), and moves each batch through its statuses: validating,
in_progress, finalizing, completed; or failed, expired, cancelling, cancelled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from redis import Redis
from redis.exceptions import RedisError

from scheduler.line_jobs import LineJobs, custom_id_of, stopped_message
from scheduler.tokens import PromptCounter
from shared import keys
from shared.batches import lines as batch_lines
from shared.batches.ledger import CLAIMED, RELEASED, BatchLedger, event_value
from shared.batches.metrics import BATCH_STATUSES, BatchMetrics
from shared.batches.records import BatchErrorEntry, BatchErrors, StoredBatch
from shared.batches.release import BatchLoad, Caps, release_plan
from shared.batches.store import READ_CHUNK, RedisFileStore
from shared.cancellation import cancels_requested
from shared.connection import connect
from shared.contract import TERMINAL_STATUSES, JobStatus
from shared.jobstore import lifecycle, rqstore
from shared.settings import Settings
from shared.tracing import context_from
from shared.webhooks import WebhookSender

log = structlog.get_logger()
tracer = trace.get_tracer("gptoss.scheduler")

CLAIM_STALE = 30.0
"""Seconds after which a line claimed but never made a job is taken over (its feeder died between)."""


class Feeder:
    """Feeds every running batch's lines to the queues and settles them as their jobs end."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        counter: PromptCounter,
        metrics: BatchMetrics | None = None,
        webhooks: WebhookSender | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._settings, self._redis = settings, redis
        self._metrics, self._webhooks, self._clock = metrics, webhooks, clock
        self._files = RedisFileStore(redis)
        self._ledger = BatchLedger(redis)
        self._jobs = LineJobs(settings, redis, counter, self._ledger, clock)
        self._caps = Caps(
            settings.batch_jobs_in_flight, settings.batch_tenant_jobs_in_flight, settings.batch_jobs_waiting
        )
        self._turn = 0

    def run(self, stop: threading.Event) -> None:
        """Feed until `stop` is set, a round every `batch_feeder_interval` seconds; a Redis outage
        pauses it, an unexpected error is logged and the next round tries again."""
        while not stop.is_set():
            try:
                self.round()
            except RedisError as exc:
                log.warning("redis_unavailable", error=str(exc), during="batch_feeding")
            except Exception:  # the boundary of the feeder's thread: never let it die
                log.exception("batch_feeder_failed")
            stop.wait(self._settings.batch_feeder_interval)

    def round(self) -> None:
        """One round: settle what ended, move statuses, release lines where the caps leave room."""
        structlog.contextvars.clear_contextvars()
        active = self._ledger.active()
        if not active:
            self._gauge([], 0, 0)
            return
        started = time.perf_counter()
        with tracer.start_as_current_span(
            "batch.feeder_round", attributes={"gptoss.batch.active": len(active)}
        ):
            tended = [t for t in (self._tend_one(tenant, batch_id) for tenant, batch_id in active) if t]
            loads = [load for _, load, _ in tended if load is not None]
            waiting = sum(count for _, _, count in tended)
            plan = release_plan(loads, waiting, self._caps, self._turn)
            self._turn += 1
            for batch, _, _ in tended:
                if count := plan.get(batch.id, 0):
                    with self._about(batch):
                        self._release(batch, count)
            released = sum(plan.values())
            in_flight = sum(load.in_flight for load in loads)
            self._gauge([batch for batch, _, _ in tended], in_flight + released, waiting + released)
        if self._metrics is not None:
            self._metrics.round_duration.observe(time.perf_counter() - started)

    def _tend_one(self, tenant: str, batch_id: str) -> tuple[StoredBatch, BatchLoad | None, int] | None:
        batch = self._ledger.get(tenant, batch_id)
        if batch is None:  # its record is gone (flushed by hand): nothing left to feed
            self._redis.zrem(keys.ACTIVE_BATCHES, keys.scoped(tenant, batch_id))
            return None
        with self._about(batch):
            return self._tend(batch)
        return None  # its round failed, logged: tried again next round

    @contextmanager
    def _about(self, batch: StoredBatch) -> Iterator[None]:
        """Log lines name the batch; its trouble is logged and stops no other batch (Redis's own
        trouble stops the round)."""
        structlog.contextvars.bind_contextvars(batch_id=batch.id, tenant=batch.tenant)
        try:
            yield
        except RedisError:
            raise
        except Exception:
            log.exception("batch_round_failed")
        finally:
            structlog.contextvars.unbind_contextvars("batch_id", "tenant")

    # --- one batch's round -------------------------------------------------------------------------

    def _tend(self, batch: StoredBatch) -> tuple[StoredBatch, BatchLoad | None, int]:
        """Validate, expire, settle ended jobs and end the batch when it is done; the batch as it is
        now, its load (when it may release more) and its jobs waiting for a worker."""
        now = self._clock()
        if batch.status == "validating":
            self._validate(batch, int(now))
        elif batch.status == "in_progress" and not batch.stop and now >= batch.expires_at:
            if self._ledger.stop(batch.tenant, batch.id, "expire"):
                log.info("batch_expiring", reason="completion window over")
        batch = self._ledger.get(batch.tenant, batch.id) or batch
        stopping = "cancel" if batch.status == "cancelling" else batch.stop
        waiting = self._settle_ended(batch, stopping, now)
        batch = self._ledger.get(batch.tenant, batch.id) or batch
        self._finish(batch, int(now))
        batch = self._ledger.get(batch.tenant, batch.id) or batch
        if batch.status != "in_progress" or batch.stop:
            return batch, None, waiting
        open_count = len(self._ledger.open_lines(batch.tenant, batch.id))
        load = BatchLoad(batch.id, batch.tenant, open_count, batch.total - batch.cursor)
        return batch, load, waiting

    def _validate(self, batch: StoredBatch, now: int) -> None:
        """validating -> in_progress, or failed when the input file cannot run as this batch."""
        file = self._files.get(batch.tenant, batch.input_file_id)
        problem: tuple[str, str] | None = None
        if file is None:
            problem = ("invalid_file", f"The input file `{batch.input_file_id}` no longer exists.")
        elif other := sorted(set(file.urls) - {batch.endpoint}):
            problem = (
                "mismatched_endpoint",
                f"The file's lines call {', '.join(other)}; this batch's endpoint is {batch.endpoint}.",
            )
        elif file.lines == 0:
            problem = ("empty_file", "The input file has no lines.")
        if problem is None:
            assert file is not None
            if self._ledger.advance(batch, ("validating",), "in_progress", now, total=file.lines):
                log.info("batch_status", status="in_progress", lines=file.lines)
            return
        errors = BatchErrors(data=[BatchErrorEntry(code=problem[0], message=problem[1])])
        self._end(batch, ("validating",), "failed", now, "", errors=errors.model_dump_json())

    def _settle_ended(self, batch: StoredBatch, stopping: str, now: float) -> int:
        """Write the lines whose jobs ended, ask a stopping batch's others to stop, take over stale
        claims; how many of its jobs wait for a worker."""
        open_lines = self._ledger.open_lines(batch.tenant, batch.id)
        released = {
            line: value[len(RELEASED) :].partition(":")
            for line, value in open_lines.items()
            if value.startswith(RELEASED)
        }
        jobs = dict(
            zip(released, rqstore.fetch_many([j for j, _, _ in released.values()], self._redis), strict=True)
        )
        waiting, running = 0, []
        for line, (job_id, _, custom_id) in released.items():
            job = jobs[line]
            status = self._status(job)
            if status in TERMINAL_STATUSES or job is None:
                self._settle_job(batch, line, job_id, custom_id, job, stopping)
            else:
                running.append(job)
                waiting += status not in (JobStatus.STARTED, JobStatus.CANCELLING)
        if stopping and running:
            self._cancel(running, stopping)
        for line, value in open_lines.items():
            if value.startswith(CLAIMED) and now - float(value[len(CLAIMED) :]) > CLAIM_STALE:
                self._stale_claim(batch, line, value, stopping, now)
        return waiting

    def _status(self, job: Any) -> JobStatus | None:
        if job is None:
            return None
        return lifecycle.read(job).status(job.get_status(refresh=False))

    def _settle_job(
        self, batch: StoredBatch, line: int, job_id: str, custom_id: str, job: Any, stopping: str
    ) -> None:
        """Write the output or error line of the ended `job` of line `line`."""
        text, outcome, label = self._jobs.ending(batch, job_id, custom_id, job, stopping)
        if self._ledger.settle(batch, line, outcome, text, int(self._clock())):
            self._count_line(label)
            log.info("batch_line_settled", line=line + 1, job_id=job_id, outcome=outcome)

    def _cancel(self, jobs: list[Any], stopping: str) -> None:
        """Ask a stopping batch's jobs to stop: waiting ones end now, running ones at their next step."""
        asked = cancels_requested(self._redis, [job.id for job in jobs])
        for job in jobs:
            if job.id not in asked:
                lifecycle.cancel(self._redis, job, stopped_message(stopping))

    def _stale_claim(self, batch: StoredBatch, line: int, value: str, stopping: str, now: float) -> None:
        """A line claimed by a feeder that died before its job existed: released again, or, when
        the batch stops, dropped (cancelled) or written as not run (expired)."""
        if stopping == "cancel":
            self._ledger.forget(batch, line)
        elif stopping == "expire":
            custom_id = custom_id_of(self._files.lines(batch.tenant, batch.input_file_id, line, 1))
            text = batch_lines.unrun_line(custom_id, "batch_expired", stopped_message("expire"))
            if self._ledger.settle(batch, line, "failed", text, int(now)):
                self._count_line("expired")
        elif self._ledger.reclaim(batch.tenant, batch.id, line, value, now):
            log.warning("batch_line_reclaimed", line=line + 1)
            self._release_lines(batch, [line])

    def _finish(self, batch: StoredBatch, now: int) -> None:
        """End the batch once nothing is open: cancelled, expired (its unclaimed lines written as not
        run), or finalizing then completed."""
        if batch.status == "cancelling":
            self._end(batch, ("cancelling",), "cancelled", now, "open")
        elif batch.status == "in_progress" and batch.stop == "expire":
            if self._ledger.open_lines(batch.tenant, batch.id):
                return
            self._write_unrun(batch, now)
            self._end(batch, ("in_progress",), "expired", now, "all")
        elif batch.status == "in_progress" and batch.cursor >= batch.total:
            if self._ledger.advance(batch, ("in_progress",), "finalizing", now, "all"):
                log.info("batch_status", status="finalizing")
                self._end(batch, ("finalizing",), "completed", now, "all")

    def _write_unrun(self, batch: StoredBatch, now: int) -> None:
        """The error lines (`batch_expired`) of every line never claimed, a chunk at a time."""
        cursor = batch.cursor
        message = stopped_message("expire")
        while cursor < batch.total:
            chunk = self._files.lines(batch.tenant, batch.input_file_id, cursor, READ_CHUNK)
            count = min(READ_CHUNK, batch.total - cursor)
            texts = [
                batch_lines.unrun_line(custom_id_of(chunk[i : i + 1]), "batch_expired", message)
                for i in range(count)
            ]
            if not self._ledger.unrun(batch, cursor, texts, now):
                return  # another feeder moved the cursor first: it writes the rest
            self._count_line("expired", count)
            cursor += count

    def _end(
        self, batch: StoredBatch, from_: tuple[str, ...], to: str, now: int, when: Any, **fields: Any
    ) -> None:
        webhook = None
        if batch.webhook and self._webhooks is not None and self._webhooks.enabled:
            webhook = event_value(batch.webhook, batch.tenant, batch.id, to, now)
        ttl = self._settings.batch_ttl
        if not self._ledger.advance(batch, from_, to, now, when, ttl, webhook, **fields):
            return
        log.info("batch_status", status=to)
        if self._metrics is not None:
            self._metrics.batches_ended.labels(to).inc()
        if webhook is not None and self._webhooks is not None:
            self._webhooks.deliver_entry(*webhook)

    # --- releasing lines ---------------------------------------------------------------------------

    def _release(self, batch: StoredBatch, count: int) -> None:
        claimed = self._ledger.claim(batch.tenant, batch.id, count, self._clock())
        if claimed:
            self._release_lines(batch, list(claimed))

    def _release_lines(self, batch: StoredBatch, lines: list[int]) -> None:
        """Make each claimed line a job (or, refused as the endpoint would refuse it, an error line)."""
        with tracer.start_as_current_span(
            "batch.release",
            context=context_from(batch.traceparent, batch.tracestate),
            attributes={"gptoss.batch.id": batch.id, "gptoss.batch.lines": len(lines)},
        ):
            texts = self._files.lines(batch.tenant, batch.input_file_id, lines[0], lines[-1] - lines[0] + 1)
            released = 0
            for line in lines:
                raw = texts[line - lines[0]] if line - lines[0] < len(texts) else None
                released += self._release_line(batch, line, raw)
        if released:
            log.info("batch_lines_released", lines=released)
            if self._metrics is not None:
                self._metrics.lines_released.inc(released)

    def _release_line(self, batch: StoredBatch, line: int, raw: str | None) -> int:
        refused = self._jobs.release(batch, line, raw)
        if refused is None:
            return 1
        text, code = refused
        if self._ledger.settle(batch, line, "failed", text, int(self._clock())):
            self._count_line("refused")
            log.info("batch_line_refused", line=line + 1, code=code)
        return 0

    # --- telemetry ----------------------------------------------------------------------------------

    def _count_line(self, outcome: str, count: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.lines_finished.labels(outcome).inc(count)

    def _gauge(self, batches: list[StoredBatch], in_flight: int, waiting: int) -> None:
        if self._metrics is None:
            return
        for status in BATCH_STATUSES:
            self._metrics.batches.labels(status).set(sum(b.status == status for b in batches))
        self._metrics.jobs_in_flight.set(in_flight)
        self._metrics.jobs_waiting.set(waiting)


def start_feeder(
    settings: Settings, registry: CollectorRegistry | None, webhooks: WebhookSender, stop: threading.Event
) -> threading.Thread:
    """The feeder in a thread of its own, with its own Redis connection and tokenizer: a round
    (tokenizing lines, reading jobs) never delays the loop's next take, and the loop's blocking
    takes never delay a round."""
    redis = connect(settings.redis_url_or_default(), acks=settings.redis_acks())
    counter = PromptCounter(settings.cache_dir, settings.vocab_dir())
    metrics = BatchMetrics(registry) if registry is not None else None
    feeder = Feeder(settings, redis, counter, metrics, webhooks)
    thread = threading.Thread(target=feeder.run, args=(stop,), name="gptoss-batch-feeder", daemon=True)
    thread.start()
    return thread
