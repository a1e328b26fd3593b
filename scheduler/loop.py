"""The scheduler loop: the Redis I/O around `admit()` and `route()`, each decision visible as a
log event, a metric, a span and a record in job.meta."""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from scheduler.intake import Intake
from scheduler.routing import Admission, admit, route
from scheduler.tokens import PromptCounter
from shared import decisions, keys
from shared.contract import JobRequest, RouteTaken
from shared.errors import GptossError
from shared.metrics import SchedulerMetrics
from shared.queues import open_queue
from shared.registry import ModelSpec, load_registry, model_spec
from shared.settings import Settings
from shared.stages import (
    META_MODEL,
    META_REJECTED,
    META_REQUEST_ID,
    META_ROUTE,
    META_TIMESTAMPS,
    STAGE_RECEIVED,
    STAGE_SCHEDULED,
    stamp,
)
from shared.tracing import context_from, inject_into

log = structlog.get_logger()
tracer = trace.get_tracer("gptoss.scheduler")

TAKE_TIMEOUT = 1.0
"""Seconds one BLMOVE waits, so a stop request is noticed quickly."""

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
    ):
        self._settings = settings
        self._redis = redis
        self._counter = counter
        self._metrics = metrics
        self._intake = Intake(redis)
        self._registry = load_registry()
        self.routed = 0

    def run(self, stop: threading.Event) -> None:
        """Schedule jobs until `stop` is set; a Redis outage pauses the loop, it never ends it."""
        self._intake.recover()
        while not stop.is_set():
            try:
                job = self._intake.take(TAKE_TIMEOUT)
                if job is not None:
                    self.schedule(job)
            except RedisError as exc:
                log.warning("redis_unavailable", error=str(exc))
                stop.wait(REDIS_RETRY_PAUSE)

    def schedule(self, job: Job) -> None:
        """Admit and route one job, or reject it with a reason; the job is never dropped."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=job.id, request_id=job.meta.get(META_REQUEST_ID))
        started = time.perf_counter()
        received = job.meta.get(META_TIMESTAMPS, {}).get(STAGE_RECEIVED)
        parent = context_from(job.meta)
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
            try:
                request = JobRequest.model_validate(job.args[0])
                spec = model_spec(request.model or self._settings.model, self._registry)
                with tracer.start_as_current_span(
                    "scheduler.count_tokens", attributes={"gen_ai.request.model": spec.name}
                ):
                    prompt_tokens = self._counter.count(spec, request)
            except (GptossError, ValidationError, IndexError) as exc:
                self._reject(job, Admission(False, getattr(exc, "code", "invalid_job"), str(exc)), None)
                return
            except Exception:  # the boundary: log it, reject the job, keep scheduling
                log.exception("scheduling_failed")
                self._reject(
                    job, Admission(False, "scheduling_failed", "The scheduler could not read this job."), None
                )
                return
            self._decide(job, spec, request, prompt_tokens)
        if self._metrics is not None:
            self._metrics.schedule_duration.observe(time.perf_counter() - started)

    def _decide(self, job: Job, spec: ModelSpec, request: JobRequest, prompt_tokens: int) -> None:
        max_tokens = request.max_tokens or self._settings.default_max_tokens
        with tracer.start_as_current_span("scheduler.admission") as span:
            admission = admit(prompt_tokens, max_tokens, spec.context_length)
            span.set_attributes({"gptoss.admission.outcome": _outcome(admission),
                                 "gptoss.admission.reason": admission.code or "fits_context",
                                 "gen_ai.usage.input_tokens": prompt_tokens})  # fmt: skip
        if not admission.admitted:
            self._reject(job, admission, prompt_tokens)
            return
        self._count_admission(admission)
        log.info("admission_decided", outcome="admitted", reason="fits_context", prompt_tokens=prompt_tokens)
        with tracer.start_as_current_span("scheduler.route") as span:
            decision = route(prompt_tokens, self._settings.multi_gpu_threshold)
            span.set_attributes(
                {"gptoss.route.queue": decision.queue, "gptoss.route.reason": decision.reason}
            )
            taken = RouteTaken(
                queue=decision.queue,
                reason=decision.reason,
                prompt_tokens=prompt_tokens,
                threshold=self._settings.multi_gpu_threshold,
            )
            job.meta[META_ROUTE] = taken.model_dump()
            stamp(job.meta, STAGE_SCHEDULED, time.time())
            inject_into(job.meta)  # the worker's spans become children of this one
            self._intake.hand_over(job, open_queue(decision.queue, self._redis))
        self.routed += 1
        if self._metrics is not None:
            self._metrics.routing_decisions.labels(decision.queue, decision.reason).inc()
        self._remember(job, "route", decision.queue, decision.reason, prompt_tokens)
        log.info("route_decided", queue=decision.queue, reason=decision.reason, prompt_tokens=prompt_tokens)

    def _reject(self, job: Job, admission: Admission, prompt_tokens: int | None) -> None:
        code = admission.code or "rejected"
        job.meta[META_REJECTED] = {"code": code, "message": admission.message or ""}
        self._intake.reject(job, keys.FAILURE_TTL)
        self._count_admission(admission)
        if self._metrics is not None:
            self._metrics.jobs_terminal.labels(job.meta.get(META_MODEL, ""), "rejected").inc()
        self._remember(job, "admission", "rejected", code, prompt_tokens)
        log.info("admission_decided", outcome="rejected", reason=code, prompt_tokens=prompt_tokens)

    def _count_admission(self, admission: Admission) -> None:
        if self._metrics is not None:
            self._metrics.admission_decisions.labels(
                _outcome(admission), admission.code or "fits_context"
            ).inc()

    def _remember(self, job: Job, kind: str, outcome: str, reason: str, prompt_tokens: int | None) -> None:
        entry: dict[str, Any] = {"at": time.time(), "job_id": job.id, "kind": kind, "outcome": outcome,
                                 "reason": reason, "prompt_tokens": prompt_tokens}  # fmt: skip
        try:
            decisions.record(self._redis, entry)
        except RedisError as exc:  # a lost record must not lose the job
            log.warning("decision_not_recorded", error=str(exc))


def _outcome(admission: Admission) -> str:
    return "admitted" if admission.admitted else "rejected"
