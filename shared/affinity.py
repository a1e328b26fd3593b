"""Affinity: which worker holds a session's KV cache (a Redis key with the session's TTL), which
worker is decoding a cacheable request (while it decodes), and the worker's own queue, where the
scheduler sends that session's turns and requests identical to the one it decodes."""

from __future__ import annotations

from redis import Redis

from shared import keys
from shared.jobstore.rqstore import own_queue_names


def remember_worker(redis: Redis, tenant: str, session_id: str, worker: str, ttl: int) -> None:
    """Session `session_id` of `tenant` is cached on `worker` for the next `ttl` seconds."""
    redis.set(keys.session_affinity(tenant, session_id), worker, ex=ttl)


def worker_of(redis: Redis, tenant: str, session_id: str) -> str | None:
    """The worker holding the session's cache, as last recorded (it may have gone since)."""
    return _name(redis.get(keys.session_affinity(tenant, session_id)))


def mark_decoding(redis: Redis, fingerprint: str, worker: str, ttl: int) -> None:
    """`worker` decodes the request of `fingerprint` now (for at most `ttl` seconds)."""
    redis.set(keys.decoding(fingerprint), worker, ex=max(1, ttl))


def unmark_decoding(redis: Redis, fingerprint: str, worker: str) -> None:
    """`worker` no longer decodes `fingerprint` (another worker's mark is left alone)."""
    key = keys.decoding(fingerprint)
    if _name(redis.get(key)) == worker:
        redis.delete(key)


def decoding_worker(redis: Redis, fingerprint: str) -> str | None:
    """The worker decoding the request of `fingerprint`, as last marked (it may have gone since)."""
    return _name(redis.get(keys.decoding(fingerprint)))


def _name(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def own_queue_owners(redis: Redis) -> set[str]:
    """Workers that have an own queue registered in RQ."""
    return {name[len(keys.OWN_QUEUE_PREFIX) :] for name in own_queue_names(redis)}
