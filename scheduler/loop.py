"""The scheduler loop: the Redis I/O around `admit()` and `route()`, each decision visible as a
log event, a metric, a span and the job's record."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from scheduler.routing import (
    AFFINITY_REASONS,
    REASON_IDENTICAL_DECODING,
    REASON_SESSION_AFFINITY,
    Decision,
    Thresholds,
    WorkerState,
    place,
)
from scheduler.tokens import PromptCounter
from shared import decisions, keys
from shared.affinity import decoding_worker, worker_of
from shared.cancellation import cancel_requested
from shared.context_fit import Admission, admit
from shared.contract import ErrorInfo, JobRequest, RouteTaken
from shared.errors import GptossError
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore import lifecycle
from shared.jobstore.intake import Intake
from shared.jobstore.record import Ending, JobRecord
from shared.jobstore.views import build_view
from shared.metrics import SchedulerMetrics
from shared.registry import load_registry, model_spec
from shared.settings import Settings
from shared.webhooks import WebhookSender, notify

log = structlog.get_logger()
tracer = trace.get_tracer("gptoss.scheduler")

TAKE_TIMEOUT = 1.0
"""Seconds one BLMOVE waits, so a stop request is noticed quickly."""

HELD_POLL = 0.5
"""Seconds between re-examinations of held jobs (the BLMOVE wait while any are held)."""

REDIS_RETRY_PAUSE = 1.0
"""Seconds to wait after a Redis error before trying again."""


class Scheduler:
    """Admits and routes every job that arrives on `incoming`."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        counter: PromptCounter,
        metrics: SchedulerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._settings = settings
        self._clock = clock
        self._redis = redis
        self._counter = counter
        self._metrics = metrics
        self._intake = Intake(redis)
        self.webhooks = self._webhooks = WebhookSender(settings, redis)
        self._registry = load_registry()
        self._limits = Thresholds(
            multi_gpu_threshold=settings.multi_gpu_threshold,
            long_prompt_tokens=settings.long_prompt_tokens,
            warn=settings.memory_warn,
            critical=settings.memory_critical,
            hold_timeout=settings.hold_timeout,
        )
        self.routed = 0

    def run(self, stop: threading.Event, on_tick: Callable[[], object] | None = None) -> None:
        """Schedule jobs until `stop` is set, calling `on_tick` (the reaper) between takes; a Redis
        outage pauses the loop, it never ends it. At start, and once Redis answers after an outage,
        jobs left in flight (by a previous scheduler, or by this one when Redis went away mid-decision)
        go back to `incoming`."""
        recover = True
        while not stop.is_set():
            try:
                if recover:
                    self._intake.recover()
                    recover = False
                if on_tick is not None:
                    on_tick()
                held = self._intake.held()
                job = self._intake.take(HELD_POLL if held else TAKE_TIMEOUT)
                if job is not None:
                    self.schedule(job)
                if held:
                    self.review_held()
            except RedisError as exc:
                log.warning("redis_unavailable", error=str(exc))
                recover = True
                stop.wait(REDIS_RETRY_PAUSE)

    def schedule(self, job: Job) -> None:
        """Admit and place one new job: route, hold or reject it with a reason; never drop it."""
        record = lifecycle.read(job)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=job.id, request_id=record.request_id)
        started = time.perf_counter()
        received = record.at("received")
        parent = record.trace_context()
        if received is not None:
            # The wait in `incoming`, as a span of its own, so a trace shows where time went.
            wait = tracer.start_span("queue.wait incoming", context=parent, start_time=int(received * 1e9))
            wait.end()
        with tracer.start_as_current_span(
            "scheduler.schedule",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "rq", "messaging.destination.name": keys.INCOMING_QUEUE,
                        "messaging.message.id": job.id},
        ):  # fmt: skip
            if self._ends_unrouted(job, record):
                return
            try:
                request = JobRequest.model_validate(job.args[0])
                spec = model_spec(request.model or self._settings.model, self._registry)
                prompt_tokens = record.prompt_tokens
                if prompt_tokens is None:  # an API without the tokenizer, or a job enqueued by hand
                    with tracer.start_as_current_span(
                        "scheduler.count_tokens", attributes={"gen_ai.request.model": spec.name}
                    ):
                        prompt_tokens = self._counter.count(spec, request)
            except (GptossError, ValidationError, IndexError) as exc:
                self._reject(job, record, getattr(exc, "code", "invalid_job"), str(exc), None)
                return
            except Exception:  # the boundary: log it, reject the job, keep scheduling
                log.exception("scheduling_failed")
                self._reject(job, record, "scheduling_failed", "The scheduler could not read this job.", None)
                return
            record.prompt_tokens = prompt_tokens
            max_tokens = request.max_tokens or self._settings.default_max_tokens
            with tracer.start_as_current_span("scheduler.admission") as span:
                admission = admit(prompt_tokens, max_tokens, spec.context_length)
                span.set_attributes({"gptoss.admission.outcome": _outcome(admission),
                                     "gptoss.admission.reason": admission.code or "fits_context",
                                     "gen_ai.usage.input_tokens": prompt_tokens})  # fmt: skip
            if not admission.admitted:
                self._reject(
                    job, record, admission.code or "rejected", admission.message or "", prompt_tokens
                )
                return
            self._place(job, record, prompt_tokens)
        if self._metrics is not None:
            self._metrics.schedule_duration.observe(time.perf_counter() - started)

    def review_held(self) -> None:
        """Re-examine every held job against the workers' latest heartbeats, oldest first, a batch's
        lines after every other job (never placed ahead of an interactive one)."""
        jobs = [self._intake.fetch_held(job_id) for job_id in self._intake.held()]
        held = [(job, lifecycle.read(job)) for job in jobs if job is not None]
        held.sort(key=lambda pair: pair[1].priority == keys.BATCH_PRIORITY)  # stable: arrival order kept
        for job, record in held:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(job_id=job.id, request_id=record.request_id)
            with tracer.start_as_current_span("scheduler.review_held", context=record.trace_context()):
                if not self._ends_unrouted(job, record):
                    self._place(job, record, record.prompt_tokens or 0)

    def _ends_unrouted(self, job: Job, record: JobRecord) -> bool:
        """End a job a client cancelled, or one past its start deadline, before it reaches a worker."""
        now = self._clock()
        if cancel_requested(self._redis, job.id):
            self._reject(job, record, "job_cancelled", "Cancelled by the client.", None, "cancelled")
            return True
        if record.past_deadline(now):
            self._reject(job, record, "deadline_exceeded", record.expiry_message(now), None, "expired")
            return True
        return False

    def _place(self, job: Job, record: JobRecord, prompt_tokens: int) -> None:
        now = self._clock()
        received = record.at("received") or now
        workers = [
            WorkerState(queue=b.queue, pressure=b.pressure, free_slots=b.free_slots, name=b.name)
            for b in read_live(self._redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
            if b.state != "loading"
        ]
        affinity, why = self._affinity(job, record)
        decision = place(prompt_tokens, workers, now - received, self._limits, affinity, why)
        if affinity is not None and decision.reason != why:
            # The worker is gone or cannot take it: routed as usual (a full prefill, or generating).
            log.info(f"{why}_lost", worker=affinity, reason=decision.reason)
        if decision.action == "reject":
            self._reject(job, record, decision.reason, decision.message, prompt_tokens)
        elif decision.action == "hold":
            self._hold(job, record, decision, received, prompt_tokens)
        else:
            self._route(job, record, decision, prompt_tokens)

    def _affinity(self, job: Job, record: JobRecord) -> tuple[str | None, str]:
        """The worker holding the cache of the job's session, if it is a session's turn; else the
        worker decoding an identical request, if it is cacheable (it follows that one there); and
        why."""
        payload = job.args[0] if job.args else None
        session_id = payload.get("session_id") if isinstance(payload, dict) else None
        if session_id:
            return worker_of(self._redis, record.tenant_or_default, session_id), REASON_SESSION_AFFINITY
        if record.cache_key is not None:
            return decoding_worker(self._redis, record.cache_key.fingerprint), REASON_IDENTICAL_DECODING
        return None, REASON_SESSION_AFFINITY

    def _route(self, job: Job, record: JobRecord, decision: Decision, prompt_tokens: int) -> None:
        queue = decision.queue or keys.SINGLE_QUEUE
        was_held = record.held is not None
        record.held = None
        if not was_held:
            self._count_admission("admitted", "fits_context")
            log.info(
                "admission_decided", outcome="admitted", reason="fits_context", prompt_tokens=prompt_tokens
            )
        else:
            self._count_admission("released", decision.reason)
        with tracer.start_as_current_span("scheduler.route") as span:
            span.set_attributes({"gptoss.route.queue": queue, "gptoss.route.reason": decision.reason})
            record.route = RouteTaken(
                queue=queue,
                reason=decision.reason,
                prompt_tokens=prompt_tokens,
                threshold=self._settings.multi_gpu_threshold,
            )
            record.stamp("scheduled", self._clock())
            record.carry_trace()  # the worker's spans become children of this one
            # A worker's own queue has no priority levels (it serves it before all others).
            own = decision.reason in AFFINITY_REASONS
            target = queue if own else keys.priority_queue(queue, record.priority)
            self._intake.hand_over(job, record, target)
        self.routed += 1
        if self._metrics is not None:
            label = keys.OWN_QUEUES_LABEL if decision.reason in AFFINITY_REASONS else queue
            self._metrics.routing_decisions.labels(label, decision.reason).inc()
        self._remember(job, "route", queue, decision.reason, prompt_tokens)
        log.info(
            "route_decided", queue=queue, reason=decision.reason, prompt_tokens=prompt_tokens, held=was_held
        )

    def _hold(
        self, job: Job, record: JobRecord, decision: Decision, received: float, prompt_tokens: int
    ) -> None:
        previous = record.held.code if record.held is not None else None
        record.held = ErrorInfo(code=decision.reason, message=decision.message)
        if previous == decision.reason:
            self._intake.hold(job, record, received)  # still held for the same reason: nothing new to tell
            return
        with tracer.start_as_current_span("scheduler.hold") as span:
            span.set_attributes(
                {"gptoss.admission.outcome": "held", "gptoss.admission.reason": decision.reason}
            )
            self._intake.hold(job, record, received)
        self._count_admission("held", decision.reason)
        self._remember(job, "admission", "held", decision.reason, prompt_tokens)
        log.info("admission_decided", outcome="held", reason=decision.reason, prompt_tokens=prompt_tokens)

    def _reject(
        self,
        job: Job,
        record: JobRecord,
        code: str,
        message: str,
        prompt_tokens: int | None,
        kind: Ending = "rejected",
    ) -> None:
        """End `job` unrouted: rejected, or (`kind`) cancelled or expired; its webhook is told."""
        self._intake.end_unrouted(job, record, kind, code, message)
        self._count_admission(kind, code)
        if self._metrics is not None:
            self._metrics.jobs_terminal.labels(record.model, kind).inc()
        self._remember(job, "admission", kind, code, prompt_tokens)
        log.info("admission_decided", outcome=kind, reason=code, prompt_tokens=prompt_tokens)
        notify(self._webhooks, build_view(job.id, record, "canceled"), record)

    def _count_admission(self, outcome: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.admission_decisions.labels(outcome, reason).inc()

    def _remember(self, job: Job, kind: str, outcome: str, reason: str, prompt_tokens: int | None) -> None:
        entry: dict[str, Any] = {"at": time.time(), "job_id": job.id, "kind": kind, "outcome": outcome,
                                 "reason": reason, "prompt_tokens": prompt_tokens}  # fmt: skip
        try:
            decisions.record(self._redis, entry)
        except RedisError as exc:  # a lost record must not lose the job
            log.warning("decision_not_recorded", error=str(exc))


def _outcome(admission: Admission) -> str:
    return "admitted" if admission.admitted else "rejected"
