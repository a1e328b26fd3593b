"""The scheduler loop: the Redis I/O around `admit()` and `route()`."""

from __future__ import annotations

import threading
import time

import structlog
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from scheduler.intake import Intake
from scheduler.routing import admit, route
from scheduler.tokens import PromptCounter
from shared import keys
from shared.contract import JobRequest, RouteTaken
from shared.errors import GptossError
from shared.queues import open_queue
from shared.registry import ModelSpec, load_registry, model_spec
from shared.settings import Settings
from shared.stages import META_REJECTED, META_REQUEST_ID, META_ROUTE, STAGE_SCHEDULED, stamp

log = structlog.get_logger()

TAKE_TIMEOUT = 1.0
"""Seconds one BLMOVE waits, so a stop request is noticed quickly."""

REDIS_RETRY_PAUSE = 1.0
"""Seconds to wait after a Redis error before trying again."""


class Scheduler:
    """Admits and routes every job that arrives on `incoming`."""

    def __init__(self, settings: Settings, redis: Redis, counter: PromptCounter):
        self._settings = settings
        self._redis = redis
        self._counter = counter
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
        try:
            request = JobRequest.model_validate(job.args[0])
            spec = model_spec(request.model or self._settings.model, self._registry)
            prompt_tokens = self._counter.count(spec, request)
        except (GptossError, ValidationError, IndexError) as exc:
            self._reject(job, getattr(exc, "code", "invalid_job"), str(exc))
            return
        except Exception:  # the boundary: log it, reject the job, keep scheduling
            log.exception("scheduling_failed")
            self._reject(job, "scheduling_failed", "The scheduler could not read this job.")
            return
        self._decide(job, spec, request, prompt_tokens)

    def _decide(self, job: Job, spec: ModelSpec, request: JobRequest, prompt_tokens: int) -> None:
        max_tokens = request.max_tokens or self._settings.default_max_tokens
        admission = admit(prompt_tokens, max_tokens, spec.context_length)
        if not admission.admitted:
            self._reject(job, admission.code or "rejected", admission.message or "")
            return
        decision = route(prompt_tokens, self._settings.multi_gpu_threshold)
        taken = RouteTaken(
            queue=decision.queue,
            reason=decision.reason,
            prompt_tokens=prompt_tokens,
            threshold=self._settings.multi_gpu_threshold,
        )
        job.meta[META_ROUTE] = taken.model_dump()
        stamp(job.meta, STAGE_SCHEDULED, time.time())
        self._intake.hand_over(job, open_queue(decision.queue, self._redis))
        self.routed += 1
        log.info("route_decided", queue=decision.queue, reason=decision.reason, prompt_tokens=prompt_tokens)

    def _reject(self, job: Job, code: str, message: str) -> None:
        job.meta[META_REJECTED] = {"code": code, "message": message}
        self._intake.reject(job, keys.FAILURE_TTL)
        log.info("job_rejected", code=code)
