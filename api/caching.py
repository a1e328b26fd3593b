"""The response cache at submission: which requests may use it, under which fingerprint, and the
job a hit becomes (created finished, with its event stream written, so every way of reading a job
answers at once). A miss goes on to the queue with the fingerprint in the job's record; the worker that
finishes it stores its result there."""

from __future__ import annotations

from typing import Any

import structlog
from redis import Redis

from shared.contract import JobRequest
from shared.jobstore import lifecycle
from shared.jobstore.record import JobRecord
from shared.normalise import deterministic, fingerprint
from shared.registry import model_spec, weights_version
from shared.response_cache import ResponseCache
from shared.settings import Settings

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
    redis: Redis, payload: JobRequest, record: JobRecord, cached: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Create the job of a hit, finished with the `cached` result: (job id, result)."""
    received = record.at("received")
    for stage in ("started", "first_token", "finished"):
        record.stamp(stage, received)  # type: ignore[arg-type]
    result = {**cached, "cache": "hit"}
    job = lifecycle.create_finished(
        redis, payload.model_dump(mode="json"), record, result, f"generate {record.model} (cached)"
    )
    return str(job.id), result
