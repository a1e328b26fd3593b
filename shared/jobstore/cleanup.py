"""Keeping RQ's keys bounded: the registries of every queue the system uses lose the entries of jobs
that no longer exist (or are past the TTL RQ scored them with), RQ's worker sets lose the keys of
workers that died without unregistering, and intermediate lists lose ids of jobs that are gone.

RQ trims some of this itself, but only for the queues a live worker listens on and only every ten
minutes; it never trims a canceled registry (one entry per rejected or cancelled job, scored by when),
nor anything of a worker's own queue once that worker is gone (`rq:workers:worker:<name>` and its
registries outlive it). The scheduler's reaper runs `Cleanup.run_if_due`, so each of those structures
holds at most what still exists, plus what ended within the last CLEANUP_INTERVAL.

Follows rq's internals as pinned by rqstore.RQ_VERSION.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog
from redis import Redis
from rq import worker_registration
from rq.defaults import RQ_KEY_PREFIX
from rq.job import JobStatus
from rq.registry import BaseRegistry
from rq.utils import current_timestamp, missing_keys

from shared import keys
from shared.jobstore import rqstore

log = structlog.get_logger()

CLEANUP_INTERVAL = 60.0
"""Seconds between two cleanups: how long a registry entry may outlive its job."""

BATCH = 500
"""Registry entries checked in one round trip."""

EXPIRING = ("finished", "failed")
"""Registries scored by when their entries expire: RQ's own `cleanup()` trims them."""

ENDED = frozenset(status.value for status in rqstore.TERMINAL)
"""RQ statuses (as stored in a job's hash) of a job that will never run again."""

_WORKERS_OF_QUEUE = worker_registration.WORKERS_BY_QUEUE_KEY % ""


@dataclass(frozen=True)
class Trimmed:
    """What one cleanup took out."""

    entries: int = 0
    """Registry and intermediate-list entries of jobs gone, ended or expired."""
    workers: int = 0
    """Keys of dead workers taken out of RQ's worker sets."""


def clean(redis: Redis) -> Trimmed:
    """Trim every registry and intermediate list of every queue the system uses, and RQ's worker
    sets, of what no longer exists."""
    names = queue_names(redis)
    entries = sum(trim_queue(redis, name) for name in names)
    return Trimmed(entries=entries, workers=prune_workers(redis, names))


def queue_names(redis: Redis) -> list[str]:
    """Every queue whose registries, intermediate list or worker set may hold entries: the fixed
    queues, the workers' own queues registered now, and the own queues of workers gone (found by
    the keys that outlive them: one SCAN of the keyspace). A worker's name holds no colon
    (workers.worker.worker_name), so the own queue's name ends at the next one."""
    names = dict.fromkeys(rqstore.waiting_queues(redis))
    prefixes = [*(_prefix(registry) for registry in rqstore.REGISTRIES.values()), _WORKERS_OF_QUEUE,
                rqstore.queue_key("")]  # fmt: skip
    for raw in redis.scan_iter(match=f"{RQ_KEY_PREFIX}:*:{keys.OWN_QUEUE_PREFIX}*", count=1000):
        key = _text(raw)
        for prefix in prefixes:
            rest = key[len(prefix) :]
            if key.startswith(prefix) and rest.startswith(keys.OWN_QUEUE_PREFIX):
                worker = rest[len(keys.OWN_QUEUE_PREFIX) :].split(":", 1)[0]
                names[keys.own_queue(worker)] = None
    return list(names)


def trim_queue(redis: Redis, name: str) -> int:
    """Trim every registry and the intermediate list of queue `name`; entries taken out."""
    queue = rqstore.open_queue(name, redis)
    trimmed = 0
    for kind, registry_class in rqstore.REGISTRIES.items():
        registry = registry_class(queue=queue)
        if kind in EXPIRING:
            before = redis.zcard(registry.key)
            registry.cleanup()  # ZREMRANGEBYSCORE up to now: entries past their TTL
            trimmed += max(0, before - redis.zcard(registry.key))
        trimmed += _drop_stale(redis, registry, started=kind == "started")
    return trimmed + _trim_intermediate(redis, rqstore.intermediate_key(queue))


def prune_workers(redis: Redis, names: list[str]) -> int:
    """Take the keys of workers that no longer exist (died without unregistering: their key
    expired) out of the set of all workers and the worker set of each queue in `names`, as RQ's
    `clean_worker_registry` does; an emptied set is gone. Dead keys taken out."""
    dead = set(missing_keys(redis, sorted(worker_registration.get_keys(connection=redis))))
    if dead:
        redis.srem(worker_registration.REDIS_WORKER_KEYS, *dead)
    for name in names:
        key = worker_registration.WORKERS_BY_QUEUE_KEY % name
        members = {_text(m) for m in redis.smembers(key)}
        if missing := set(missing_keys(redis, sorted(members))):
            worker_registration.clean_worker_registry(rqstore.open_queue(name, redis))
            dead |= missing
    return len(dead)


def _drop_stale(redis: Redis, registry: BaseRegistry, started: bool) -> int:
    """Remove the entries of `registry` whose job no longer exists; in the started registry also
    those of a job that ended, or that expired while the job is not running. An expired entry of a
    job still `started` is left to the reaper: handing a job back is its decision."""
    removed = 0
    now = current_timestamp()
    for chunk in _chunks(redis.zscan_iter(registry.key, count=BATCH), BATCH):
        pipe = redis.pipeline(transaction=False)
        for member, _ in chunk:
            pipe.hget(rqstore.job_key(registry.parse_job_id(_text(member))), "status")
        statuses = pipe.execute()
        stale = [
            member
            for (member, score), status in zip(chunk, statuses, strict=True)
            if _stale(None if status is None else _text(status), score < now, started)
        ]
        if stale:
            removed += int(redis.zrem(registry.key, *stale))
    return removed


def _stale(status: str | None, expired: bool, started: bool) -> bool:
    """A registry entry of a job in RQ `status` (None: the job is gone) can go."""
    if status is None:
        return True
    return started and (status in ENDED or (expired and status != JobStatus.STARTED.value))


def _trim_intermediate(redis: Redis, key: str) -> int:
    """Remove ids of jobs that no longer exist from RQ's intermediate list `key` (others are the
    worker's to start or the reaper's to rescue)."""
    by_key = {rqstore.job_key(_text(raw)): _text(raw) for raw in redis.lrange(key, 0, -1)}
    return sum(int(redis.lrem(key, 0, by_key[gone])) for gone in missing_keys(redis, sorted(by_key)))


def _chunks(items: Iterator[tuple[bytes, float]], size: int) -> Iterator[list[tuple[bytes, float]]]:
    chunk: list[tuple[bytes, float]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prefix(registry: type[BaseRegistry]) -> str:
    return registry.key_template.format("")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Cleanup:
    """Runs `clean` at most every `interval` seconds of `clock`; the scheduler's reaper calls it."""

    def __init__(
        self, redis: Redis, interval: float = CLEANUP_INTERVAL, clock: Callable[[], float] = time.monotonic
    ):
        self._redis, self._interval, self._clock = redis, interval, clock
        self._next: float | None = None

    def run_if_due(self) -> Trimmed | None:
        """Clean when `interval` has passed since the last cleanup (the first call cleans); what it
        trimmed, or None when it was not due."""
        now = self._clock()
        if self._next is not None and now < self._next:
            return None
        self._next = now + self._interval
        trimmed = clean(self._redis)
        if trimmed.entries or trimmed.workers:
            log.info("rq_keys_trimmed", entries=trimmed.entries, workers=trimmed.workers)
        return trimmed
