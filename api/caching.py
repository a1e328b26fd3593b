"""The response cache at submission: which requests may use it, under which fingerprint, and the
job a hit becomes (created finished, with its event stream written, so every way of reading a job
answers at once). A miss goes on to the queue with the fingerprint in job.meta; the worker that
finishes it stores its result there."""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from redis import Redis

from shared import keys
from shared.contract import JobRequest, JobSubmission
from shared.finished_jobs import create_finished
from shared.normalise import deterministic, fingerprint
from shared.registry import model_spec, weights_version
from shared.response_cache import ResponseCache, channel_texts
from shared.settings import Settings
from shared.stages import (
    META_MODEL,
    META_PRIORITY,
    META_REQUEST_ID,
    META_RETENTION,
    META_TENANT,
    META_TIMESTAMPS,
    META_WEBHOOK,
    STAGE_FINISHED,
    STAGE_FIRST_TOKEN,
    STAGE_RECEIVED,
    STAGE_STARTED,
    stamp,
)
from shared.tracing import inject_into

log = structlog.get_logger()


def cache_key(settings: Settings, model: str, payload: JobRequest, tenant: str) -> str | None:
    """The fingerprint under which `payload` (canonical, profile applied) is cached, or None when it
    may not use the cache: the cache is off, the client opted out, or the output is sampled.
    Salted with the tenant unless sharing is set, so no tenant reads another's entries (nor learns
    from a fast answer that another sent the same prompt)."""
    if not (settings.response_cache and payload.cache and deterministic(payload)):
        return None
    weights = weights_version(model_spec(model), settings.weights_version)
    return fingerprint(model, payload, "" if settings.response_cache_shared else f"tenant:{tenant}", weights)


def open_cache(redis: Redis, settings: Settings) -> ResponseCache:
    """The response cache with the settings' TTL and byte budget."""
    return ResponseCache(redis, settings.response_cache_ttl, settings.response_cache_max_bytes)


def finish_from_cache(
    redis: Redis,
    settings: Settings,
    submission: JobSubmission,
    payload: JobRequest,
    cached: dict[str, Any],
    identity: dict[str, Any],
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Create the job of a hit, finished with the `cached` result: (job id, meta, result).
    `identity` holds request id, model and tenant for job.meta."""
    now = time.time()
    meta: dict[str, Any] = {
        META_REQUEST_ID: identity[META_REQUEST_ID],
        META_MODEL: identity[META_MODEL],
        META_TENANT: identity[META_TENANT],
        META_PRIORITY: submission.priority,
        META_RETENTION: settings.result_ttl,
    }
    if submission.webhook is not None:
        meta[META_WEBHOOK] = submission.webhook
    for stage in (STAGE_RECEIVED, STAGE_STARTED, STAGE_FIRST_TOKEN, STAGE_FINISHED):
        stamp(meta, stage, now)
    inject_into(meta)
    result = {**cached, "cache": "hit"}
    job = create_finished(
        redis,
        keys.GENERATE_FUNC,
        payload.model_dump(mode="json"),
        result,
        queue=keys.priority_queue(keys.INCOMING_QUEUE, submission.priority),
        meta=meta,
        ttl=settings.result_ttl,
        description=f"generate {identity[META_MODEL]} (cached)",
    )
    write_stream(redis, str(job.id), result, meta, settings.result_ttl)
    return str(job.id), meta, result


def write_stream(redis: Redis, job_id: str, result: dict[str, Any], meta: dict[str, Any], ttl: int) -> None:
    """The job's whole event stream at once (start, the reasoning and the answer as one token event
    each, done), in the worker's format, so followers and the OpenAI endpoints answer without waiting."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("start", {"model": result.get("model"), "queue": result.get("queue"), "cache": "hit"})
    ]
    for index, (channel, text) in enumerate(channel_texts(result)):
        events.append(("token", {"channel": channel, "text": text, "index": index}))
    events.append(("done", {**result, "timings": meta.get(META_TIMESTAMPS, {})}))
    key = keys.job_stream(job_id)
    pipe = redis.pipeline(transaction=False)
    for event, data in events:
        pipe.xadd(key, {"event": event, "data": json.dumps(data)})
    pipe.expire(key, ttl)
    pipe.execute()
