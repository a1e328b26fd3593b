"""Idempotency-Key: the same key with the same body gives back the same job; a different body is a
conflict. A key is claimed before the job is created, so two concurrent requests cannot both create
one."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from redis import Redis

from shared import keys
from shared.errors import IdempotencyConflict, IdempotencyInProgress, ValidationFailed

MAX_KEY_CHARS = 255
"""Longest Idempotency-Key accepted."""

CLAIM_TTL = 60
"""Seconds a claim lives while its job is being created (a crashed request frees the key after it)."""


def body_digest(route: str, body: Any) -> str:
    """SHA-256 of the route and the JSON body in canonical form (key order and spacing do not matter)."""
    canonical = json.dumps({"route": route, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> None:
    """Refuse an unusable key (422)."""
    if not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable():
        raise ValidationFailed(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable characters.")


def _key(tenant: str, key: str) -> str:
    return keys.idempotency(tenant, hashlib.sha256(key.encode()).hexdigest())


def claim(redis: Redis, tenant: str, key: str, digest: str) -> str | None:
    """Claim `key` for a new job: None when the caller should create it; the job id when the same
    body already created one. Raises IdempotencyConflict for a different body, IdempotencyInProgress
    while the first request is still creating its job."""
    name = _key(tenant, key)
    if redis.set(name, json.dumps({"digest": digest, "job_id": None}), nx=True, ex=CLAIM_TTL):
        return None
    raw = redis.get(name)
    if raw is None:  # expired between the two calls: claim again
        return claim(redis, tenant, key, digest)
    record = json.loads(raw)
    if record["digest"] != digest:
        raise IdempotencyConflict(
            "This Idempotency-Key was used with a different request body; use a new key for a new request."
        )
    if record["job_id"] is None:
        raise IdempotencyInProgress(
            "A request with this Idempotency-Key is still being processed; retry shortly.",
            headers={"Retry-After": "1"},
        )
    return str(record["job_id"])


def settle(redis: Redis, tenant: str, key: str, digest: str, job_id: str, ttl: int) -> None:
    """The claimed key now names `job_id` for `ttl` seconds."""
    redis.set(_key(tenant, key), json.dumps({"digest": digest, "job_id": job_id}), ex=ttl)


def release(redis: Redis, tenant: str, key: str) -> None:
    """Free a claim whose job was not created (refused), so the client may retry with the same key."""
    redis.delete(_key(tenant, key))
