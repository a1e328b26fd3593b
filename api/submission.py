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

from api.admission import admitted
from api.caching import cache_key, finish_from_cache, open_cache
from api.services import services
from api.tenancy import current_tenant
from shared import idempotency, keys
from shared.contract import JobRequest, JobSubmission
from shared.deadlines import start_deadline
from shared.drain import enter_backlog
from shared.errors import ModelNotFound, PromptTooLong, ValidationFailed
from shared.normalise import canonical
from shared.profiles import apply_profile, max_tokens_limit, profile_named
from shared.prompts import ModelNotPrepared, load_prompt_tokenizer, prompt_token_ids
from shared.queues import open_queue
from shared.registry import ModelSpec, canonical_name, model_spec
from shared.response_cache import store_target
from shared.retention import remember
from shared.stages import (
    META_CACHE_KEY,
    META_DEADLINE,
    META_MODEL,
    META_PRIORITY,
    META_REQUEST_ID,
    META_RETENTION,
    META_TENANT,
    META_TIMESTAMPS,
    META_WEBHOOK,
    STAGE_RECEIVED,
    stamp,
)
from shared.tracing import inject_into
from shared.views import build_view
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
    return current_app.extensions.setdefault("gptoss_webhooks", WebhookSender(services().settings))


def submit(submission: JobSubmission, route: str, body: Any) -> Submitted:
    """Validate `submission` against the served model, its profile and context, and enqueue it on the
    `incoming` queue of its priority (or, when the response cache holds its answer, create it
    finished); `route` and the raw `body` identify it for Idempotency-Key."""
    svc = services()
    submission = canonical(submission)  # before anything reads it: equal requests, equal bytes
    payload, model, max_tokens = prepare(submission.request())
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
        svc.limits.charge(tenant, max_tokens + (_count_prompt(model_spec(model), payload) or 0))
        cached = open_cache(svc.redis, svc.settings).lookup(fingerprint) if fingerprint else None
        if cached is not None:
            job_id = _finish_cached(svc.redis, submission, payload, model, tenant, cached)
        else:
            job_id = _enqueue(svc.redis, submission, payload, model, tenant, fingerprint)
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


def _finish_cached(
    redis: Redis,
    submission: JobSubmission,
    payload: JobRequest,
    model: str,
    tenant: str,
    cached: dict[str, Any],
) -> str:
    """The job of a cache hit, created finished (never queued), in the tenant's list."""
    settings = services().settings
    identity = {META_REQUEST_ID: g.request_id, META_MODEL: model, META_TENANT: tenant}
    job_id, meta, result = finish_from_cache(redis, settings, submission, payload, cached, identity)
    received = meta[META_TIMESTAMPS][STAGE_RECEIVED]
    remember(redis, job_id, tenant, received, settings.result_ttl)
    if submission.webhook is not None:
        notify(webhooks(), build_view(job_id, meta, "finished", result), meta)
    return job_id


def _enqueue(
    redis: Redis,
    submission: JobSubmission,
    payload: JobRequest,
    model: str,
    tenant: str,
    fingerprint: str | None = None,
) -> str:
    settings = services().settings
    with admitted(redis, settings, services().metrics, tenant):
        received = time.time()
        meta: dict[str, Any] = {
            META_REQUEST_ID: g.request_id,
            META_MODEL: model,
            META_TENANT: tenant,
            META_PRIORITY: submission.priority,
            META_RETENTION: settings.result_ttl,
        }
        deadline = start_deadline(received, submission.deadline, submission.cancel_after)
        if deadline is not None:
            meta[META_DEADLINE] = deadline
        if submission.webhook is not None:
            meta[META_WEBHOOK] = submission.webhook
        if fingerprint is not None:
            meta[META_CACHE_KEY] = store_target(  # the worker stores the result there
                fingerprint, settings.response_cache_ttl, settings.response_cache_max_bytes
            )
        stamp(meta, STAGE_RECEIVED, received)
        inject_into(meta)  # the scheduler and the worker continue this trace
        job = open_queue(keys.priority_queue(keys.INCOMING_QUEUE, submission.priority), redis).enqueue(
            keys.GENERATE_FUNC,
            payload.model_dump(mode="json"),
            meta=meta,
            description=f"generate {model}",  # RQ logs descriptions; the default would hold the prompt
            job_timeout=settings.job_timeout,
            result_ttl=settings.result_ttl,
            failure_ttl=settings.result_ttl,
        )
        enter_backlog(redis, tenant, job.id, received)
    remember(redis, job.id, tenant, received, settings.result_ttl)
    pipe = redis.pipeline(transaction=False)
    pipe.lpush(keys.SCHEDULER_WAKE, job.id)
    pipe.ltrim(keys.SCHEDULER_WAKE, 0, 0)
    pipe.execute()
    return str(job.id)


def prepare(job_request: JobRequest) -> tuple[JobRequest, str, int]:
    """The request as it will run (served model, profile defaults, max_tokens that fits), its model
    and its max_tokens; refuses what cannot run here (404, 413, 422)."""
    settings = services().settings
    served = settings.model
    model = canonical_name(job_request.model) if job_request.model else served
    if model != served:
        model_spec(model)  # an unknown name gets the registry's own message
        raise ModelNotFound(f"The model `{model}` is not served here; this server serves `{served}`.")
    profile_name = job_request.profile or settings.profile
    profile = profile_named(profile_name) if profile_name else None
    payload = apply_profile(
        job_request.model_copy(update={"model": model}), profile, settings.default_max_tokens
    )
    max_tokens = payload.max_tokens or settings.default_max_tokens
    limit = max_tokens_limit(profile, settings.max_tokens_limit)
    if max_tokens > limit:
        whose = f"the `{profile.name}` profile's" if profile is not None else "this server's"
        raise ValidationFailed(
            f"max_tokens is {max_tokens}, over {whose} limit of {limit}.",
            details=[{"loc": ["max_tokens"], "msg": "over the limit"}],
        )
    max_tokens = check_fits(
        model_spec(model), payload, max_tokens, explicit=job_request.max_tokens is not None
    )
    return payload.model_copy(update={"max_tokens": max_tokens}), model, max_tokens


def check_fits(spec: ModelSpec, request: JobRequest, max_tokens: int, explicit: bool = True) -> int:
    """The max_tokens to run with. Refuses at once what cannot fit the model's context: a prompt over
    it (413), or a prompt plus the client's own max_tokens over it (422); a default is shortened to
    fit instead. The scheduler checks again; here the client hears it before queueing."""
    context = spec.context_length
    if not explicit:
        max_tokens = min(max_tokens, context - 1)
    if max_tokens >= context:
        raise ValidationFailed(
            f"max_tokens is {max_tokens}; the context of `{spec.name}` is {context} tokens in all.",
            details=[{"loc": ["max_tokens"], "msg": "over the model's context"}],
        )
    prompt_tokens = _count_prompt(spec, request)
    if prompt_tokens is None:
        return max_tokens
    if prompt_tokens >= context:
        raise PromptTooLong(
            f"The prompt has {prompt_tokens} tokens; the context of `{spec.name}` is {context}."
        )
    if prompt_tokens + max_tokens > context and not explicit:
        return context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise ValidationFailed(
            f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over the context of "
            f"`{spec.name}` ({context}); lower max_tokens to {context - prompt_tokens} or less.",
            details=[{"loc": ["max_tokens"], "msg": "prompt plus max_tokens over the model's context"}],
        )
    return max_tokens


def _count_prompt(spec: ModelSpec, request: JobRequest) -> int | None:
    """The prompt's tokens; None while the model's tokenizer is not prepared."""
    tokenizer = prompt_tokenizer(spec, on="request")
    return len(prompt_token_ids(tokenizer, request)) if tokenizer is not None else None


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
