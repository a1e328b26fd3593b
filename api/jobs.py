"""`/v1/jobs`: submit a generation job and poll it."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import structlog
from flask import Blueprint, current_app, g, jsonify, request, url_for
from pydantic import ValidationError

from api.admission import admitted
from api.services import services
from api.tenancy import current_tenant, owned_job
from shared import keys
from shared.contract import (
    ErrorInfo,
    JobRequest,
    JobResult,
    JobStatus,
    JobView,
    RouteTaken,
    StageTimes,
)
from shared.drain import enter_backlog
from shared.errors import InvalidJson, JobNotFound, ModelNotFound, PromptTooLong, ValidationFailed
from shared.profiles import apply_profile, max_tokens_limit, profile_named
from shared.prompts import ModelNotPrepared, load_prompt_tokenizer, prompt_token_ids
from shared.queues import open_queue
from shared.registry import ModelSpec, canonical_name, model_spec
from shared.stages import (
    META_ERROR,
    META_HELD,
    META_MODEL,
    META_REJECTED,
    META_REQUEST_ID,
    META_ROUTE,
    META_TENANT,
    META_TIMESTAMPS,
    STAGE_RECEIVED,
    client_status,
    stamp,
)
from shared.tracing import inject_into, trace_id_of

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
log = structlog.get_logger()

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Shape of a job id we look up; anything else is unknown without touching Redis."""


@bp.post("")
def submit():  # type: ignore[no-untyped-def]
    """Validate a request and enqueue it on `incoming`; answer 202 with where to poll."""
    svc = services()
    job_request = _parse_request(_read_json())
    served = svc.settings.model
    model = canonical_name(job_request.model) if job_request.model else served
    if model != served:
        model_spec(model)  # an unknown name gets the registry's own message
        raise ModelNotFound(f"The model `{model}` is not served here; this server serves `{served}`.")
    profile_name = job_request.profile or svc.settings.profile
    profile = profile_named(profile_name) if profile_name else None
    payload = apply_profile(
        job_request.model_copy(update={"model": model}), profile, svc.settings.default_max_tokens
    )
    max_tokens = payload.max_tokens or svc.settings.default_max_tokens
    limit = max_tokens_limit(profile, svc.settings.max_tokens_limit)
    if max_tokens > limit:
        whose = f"the `{profile.name}` profile's" if profile is not None else "this server's"
        raise ValidationFailed(
            f"max_tokens is {max_tokens}, over {whose} limit of {limit}.",
            details=[{"loc": ["max_tokens"], "msg": "over the limit"}],
        )
    max_tokens = check_fits(
        model_spec(model), payload, max_tokens, explicit=job_request.max_tokens is not None
    )
    payload = payload.model_copy(update={"max_tokens": max_tokens})
    tenant = current_tenant()
    svc.limits.charge(tenant, max_tokens + (_count_prompt(model_spec(model), payload) or 0))
    with admitted(svc.redis, svc.settings, svc.metrics, tenant):
        received = time.time()
        meta: dict[str, Any] = {META_REQUEST_ID: g.request_id, META_MODEL: model, META_TENANT: tenant}
        stamp(meta, STAGE_RECEIVED, received)
        inject_into(meta)  # the scheduler and the worker continue this trace
        job = open_queue(keys.INCOMING_QUEUE, svc.redis).enqueue(
            keys.GENERATE_FUNC,
            payload.model_dump(mode="json"),
            meta=meta,
            description=f"generate {model}",  # RQ logs descriptions; the default would hold the prompt
            job_timeout=svc.settings.job_timeout,
            result_ttl=keys.RESULT_TTL,
            failure_ttl=keys.FAILURE_TTL,
        )
        enter_backlog(svc.redis, tenant, job.id, received)
    structlog.contextvars.bind_contextvars(job_id=job.id, tenant=tenant)
    svc.metrics.jobs_submitted.labels(model).inc()
    log.info("job_submitted", model=model, max_tokens=max_tokens, chat=job_request.messages is not None)
    url = url_for("jobs.show", job_id=job.id)
    response = jsonify({"id": job.id, "object": "job", "status": JobStatus.QUEUED, "url": url})
    response.status_code = 202
    response.headers["Location"] = url
    return response


@bp.get("/<job_id>")
def show(job_id: str):  # type: ignore[no-untyped-def]
    """The job's status, route, stage timestamps and, once finished, its result."""
    if not JOB_ID.match(job_id):
        raise JobNotFound(f"No job `{job_id}`.")
    job = owned_job(job_id)  # another tenant's job answers 404, as an unknown one
    return jsonify(job_view(job).model_dump(mode="json", exclude_none=True))


def job_view(job: Any) -> JobView:
    """A client's view of an RQ job."""
    meta = job.get_meta(refresh=False)
    status = client_status(job.get_status(refresh=False), meta)
    result = None
    if status is JobStatus.FINISHED and (value := job.return_value()) is not None:
        result = JobResult.model_validate(value)
    error = meta.get(META_ERROR) or meta.get(META_REJECTED)
    if status is JobStatus.FAILED and error is None:
        error = {"code": "job_failed", "message": "The job failed; see the worker's logs."}
    return JobView(
        id=job.id,
        status=status,
        model=meta.get(META_MODEL, ""),
        route=RouteTaken.model_validate(meta[META_ROUTE]) if META_ROUTE in meta else None,
        timestamps=StageTimes.model_validate(meta.get(META_TIMESTAMPS, {})),
        result=result,
        error=ErrorInfo.model_validate(error) if error and status is not JobStatus.FINISHED else None,
        url=url_for("jobs.show", job_id=job.id),
        trace_id=trace_id_of(meta),
        held=ErrorInfo.model_validate(meta[META_HELD]) if status is JobStatus.HELD else None,
    )


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
    """The prompt's tokens, with the tokenizer cached on the app; None while it is not prepared."""
    tokenizers: dict[str, Any] = current_app.extensions.setdefault("gptoss_tokenizers", {})
    if spec.name not in tokenizers:
        settings = services().settings
        try:
            tokenizers[spec.name] = load_prompt_tokenizer(spec, settings.cache_dir, settings.vocab_dir())
        except ModelNotPrepared:
            log.warning("prompt_not_counted", model=spec.name, reason="tokenizer not prepared")
            return None
    return len(prompt_token_ids(tokenizers[spec.name], request))


def _read_json() -> Any:
    raw = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH this raises 413
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"The request body is not valid JSON: {exc}.") from None


def _parse_request(body: Any) -> JobRequest:
    if not isinstance(body, dict):
        raise InvalidJson("The request body must be a JSON object.")
    try:
        return JobRequest.model_validate(body)
    except ValidationError as exc:
        details = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise ValidationFailed("The request has invalid fields.", details=details) from None
