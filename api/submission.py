"""The one submission path: `POST /v1/jobs` and the OpenAI endpoints all create their job here, as
the same RQ job on the same queue."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from flask import Flask, current_app, g, request
from redis import Redis
from redis.client import Pipeline

from api.admission import admitted
from api.arrival import arrived
from api.caching import cache_key, finish_from_cache, open_cache
from api.disconnect import client_socket, gone
from api.services import services
from api.tenancy import current_tenant
from shared import idempotency, preparation
from shared.contract import JobRequest, JobSubmission
from shared.deadlines import start_deadline
from shared.drain import enter_backlog
from shared.errors import ClientClosedRequest
from shared.jobstore import lifecycle
from shared.jobstore.record import CacheTarget, JobRecord
from shared.jobstore.views import build_view
from shared.normalise import canonical
from shared.prompts import ModelNotPrepared, load_prompt_tokenizer
from shared.registry import ModelSpec, model_spec
from shared.retention import remember
from shared.webhooks import WebhookSender, notify

log = structlog.get_logger()

IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Submitted:
    """A job created (or, with a repeated Idempotency-Key, found again)."""

    job_id: str
    model: str
    replayed: bool = False
    cached: bool = False
    """Answered from the response cache: the job is finished already."""


def webhooks() -> WebhookSender:
    """The app's webhook sender (built on first use)."""
    extensions = current_app.extensions
    if "gptoss_webhooks" not in extensions:
        extensions["gptoss_webhooks"] = WebhookSender(services().settings, services().redis)
    return extensions["gptoss_webhooks"]


def submit(submission: JobSubmission, route: str, body: Any) -> Submitted:
    """Validate `submission` against the served model, its profile and context, and enqueue it on the
    `incoming` queue of its priority (or, when the response cache holds its answer, create it
    finished); `route` and the raw `body` identify it for Idempotency-Key."""
    svc = services()
    submission = canonical(submission)  # before anything reads it: equal requests, equal bytes
    payload, model, max_tokens, prompt_tokens = prepare(submission.request())
    if submission.webhook is not None:
        webhooks().check(submission.webhook)
    tenant = current_tenant()
    key = request.headers.get(IDEMPOTENCY_HEADER)
    digest = ""
    if key is not None:
        idempotency.check_key(key)
        digest = idempotency.body_digest(route, body)
        if (existing := idempotency.claim(svc.redis, tenant, key, digest)) is not None:
            log.info("job_replayed", job_id=existing)
            return Submitted(existing, model, replayed=True)
    fingerprint = cache_key(svc.settings, model, payload, tenant)
    try:
        svc.limits.charge(tenant, max_tokens + (prompt_tokens or 0))
        cached = open_cache(svc.redis, svc.settings).lookup(fingerprint) if fingerprint else None
        record = _record(submission, model, tenant, prompt_tokens)
        if cached is not None:
            _client_still_waiting()
            job_id = _finish_cached(svc.redis, submission, payload, record, cached)
        else:
            job_id = _enqueue(svc.redis, submission, payload, record, fingerprint)
    except BaseException:
        if key is not None:
            idempotency.release(svc.redis, tenant, key)
        raise
    if key is not None:
        idempotency.settle(svc.redis, tenant, key, digest, job_id, svc.settings.idempotency_ttl)
    structlog.contextvars.bind_contextvars(job_id=job_id, tenant=tenant)
    if fingerprint is not None:
        # The fingerprint's head names the entry in logs; the prompt never appears.
        hit = cached is not None
        (svc.metrics.cache_hits if hit else svc.metrics.cache_misses).labels(model).inc()
        log.info("cache_hit" if hit else "cache_miss", model=model, fingerprint=fingerprint[:16])
    if cached is not None:
        return Submitted(job_id, model, cached=True)
    svc.metrics.jobs_submitted.labels(model).inc()
    log.info(
        "job_submitted",
        model=model,
        max_tokens=max_tokens,
        chat=payload.messages is not None,
        priority=submission.priority,
    )
    return Submitted(job_id, model)


def _record(submission: JobSubmission, model: str, tenant: str, prompt_tokens: int | None) -> JobRecord:
    """The record a new job starts with (its trace carried on, so the scheduler and the worker
    continue it)."""
    record = JobRecord(
        request_id=g.request_id,
        model=model,
        tenant=tenant,
        priority=submission.priority,
        retention=services().settings.result_ttl,
        webhook=submission.webhook,
        prompt_tokens=prompt_tokens,
    )
    record.stamp("received", arrived())  # when the request reached the app, before it was parsed
    record.deadline = start_deadline(record.timestamps.received or 0.0, submission.deadline,
                                     submission.cancel_after)  # fmt: skip
    record.carry_trace()
    return record


def _finish_cached(
    redis: Redis, submission: JobSubmission, payload: JobRequest, record: JobRecord, cached: dict[str, Any]
) -> str:
    """The job of a cache hit, created finished (never queued), in the tenant's list."""
    settings = services().settings
    job_id, result = finish_from_cache(redis, payload, record, cached)
    pipe = redis.pipeline(transaction=False)
    remember(pipe, job_id, record.tenant_or_default, record.at("received") or 0.0, settings.result_ttl)
    pipe.execute()
    if submission.webhook is not None:
        notify(webhooks(), build_view(job_id, record, "finished", result), record)
    return job_id


def _enqueue(
    redis: Redis,
    submission: JobSubmission,
    payload: JobRequest,
    record: JobRecord,
    fingerprint: str | None = None,
) -> str:
    settings = services().settings
    tenant = record.tenant_or_default
    with admitted(redis, settings, services().metrics, tenant, services().admission_turn):
        if fingerprint is not None:  # the worker stores the result there
            record.cache_key = CacheTarget(fingerprint=fingerprint, ttl=settings.response_cache_ttl,
                                           max_bytes=settings.response_cache_max_bytes)  # fmt: skip
        received = record.at("received") or time.time()
        _client_still_waiting()  # last, just before the job exists: the admission lock may have waited

        def counted(pipe: Pipeline, job_id: str) -> None:  # in the transaction that creates the job
            enter_backlog(pipe, tenant, job_id, received)
            remember(pipe, job_id, tenant, received, settings.result_ttl)

        job = lifecycle.enqueue(
            redis,
            payload.model_dump(mode="json"),
            record,
            timeout=settings.job_timeout,
            description=f"generate {record.model}",
            also=counted,
        )
    return str(job.id)


def _client_still_waiting() -> None:
    """Raise ClientClosedRequest when the client has hung up: a job created now would run for no
    one (and its answer, a 499, reaches no one either)."""
    if gone(client_socket(request.environ)):
        log.info("submission_abandoned", reason="client closed the connection")
        raise ClientClosedRequest("The client closed the connection before its job was created.")


def prepare(job_request: JobRequest) -> tuple[JobRequest, str, int, int | None]:
    """The request as it will run (served model, profile defaults, max_tokens that fits), its model,
    its max_tokens and its prompt's tokens (None while the model's tokenizer is not prepared);
    refuses what cannot run here (404, 413, 422). The decisions are shared.preparation's."""
    return preparation.prepare(job_request, services().settings, _request_tokenizer)


def _request_tokenizer(spec: ModelSpec) -> Any | None:
    return prompt_tokenizer(spec, on="request")


def prompt_tokenizer(spec: ModelSpec, on: str) -> Any | None:
    """`spec`'s tokenizer, loaded once and cached on the app (`on` says what asked first: "start"
    when the server warms it, "request" when a request comes first); None while not prepared."""
    tokenizers: dict[str, Any] = current_app.extensions.setdefault("gptoss_tokenizers", {})
    if spec.name not in tokenizers:
        # One loader at a time: concurrent first requests importing transformers at once fail
        # (its lazy module hands a half-initialised name to the second thread).
        with current_app.extensions.setdefault("gptoss_tokenizers_lock", threading.Lock()):
            if spec.name not in tokenizers:
                settings = services().settings
                started = time.perf_counter()
                try:
                    tokenizers[spec.name] = load_prompt_tokenizer(
                        spec, settings.cache_dir, settings.vocab_dir()
                    )
                except ModelNotPrepared:
                    log.warning("prompt_not_counted", model=spec.name, reason="tokenizer not prepared")
                    return None
                seconds = round(time.perf_counter() - started, 3)
                log.info("prompt_tokenizer_loaded", model=spec.name, on=on, seconds=seconds)
    return tokenizers[spec.name]


def warm_prompt_tokenizer(app: Flask, model: str) -> None:
    """Load the default model's tokenizer before the first request needs it (a background thread
    of the serving process calls this: loading takes about a second, which the first request to
    count its prompt would otherwise wait for)."""
    with app.app_context():
        try:
            prompt_tokenizer(model_spec(model), on="start")
        except Exception as exc:  # a request loads it again, and answers any error itself
            log.warning("prompt_tokenizer_not_warmed", model=model, error=str(exc))
