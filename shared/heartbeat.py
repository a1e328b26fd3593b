"""Heartbeats: each worker and scheduler keeps a short-lived JSON document in Redis while alive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

import structlog
from pydantic import BaseModel
from redis import Redis
from redis.exceptions import RedisError

log = structlog.get_logger()

Beat = TypeVar("Beat", bound=BaseModel)


class WorkerBeat(BaseModel):
    """A worker's state as it last reported it."""

    name: str
    queue: str
    model: str
    device: str
    state: Literal["loading", "idle", "busy"]
    current_job: str | None = None
    jobs_done: int = 0
    pid: int
    host: str
    at: float
    metrics_url: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    pressure: float = 0.0
    running: int = 0
    free_slots: int = 1
    tokens_per_second: float | None = None
    running_jobs: list[str] = []
    kv_cache_bytes: int = 0
    kv_cache_budget_bytes: int | None = None


class SchedulerBeat(BaseModel):
    """A scheduler's state as it last reported it."""

    name: str
    pid: int
    host: str
    routed: int = 0
    at: float
    metrics_url: str | None = None


INDEX_SLACK = 60.0
"""Seconds past its expiry an index entry is kept (clocks of several hosts may differ that much)."""


def index_of(key: str) -> str:
    """The sorted set listing the heartbeats of `key`'s kind (`key` one heartbeat's key or its kind's
    SCAN pattern): readers look there instead of scanning the whole keyspace for every decision."""
    return key.rsplit(":", 1)[0].replace(":heartbeat:", ":heartbeat-index:", 1)


def publish(redis: Redis, key: str, beat: BaseModel, ttl: int) -> None:
    """Write one heartbeat that expires after `ttl` seconds unless renewed, listed in its kind's index
    (entries long expired leave it)."""
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.set(key, beat.model_dump_json(), ex=ttl)
    pipe.zadd(index_of(key), {key: now + ttl})
    pipe.zremrangebyscore(index_of(key), "-inf", now - INDEX_SLACK)
    pipe.expire(index_of(key), ttl + int(INDEX_SLACK))
    pipe.execute()


def withdraw(redis: Redis, key: str) -> None:
    """Remove one heartbeat and its index entry (its process stops)."""
    pipe = redis.pipeline(transaction=False)
    pipe.delete(key)
    pipe.zrem(index_of(key), key)
    pipe.execute()


_READ_LIVE = """
local found = redis.call('ZRANGE', KEYS[1], 0, -1)
if #found == 0 then return {} end
return redis.call('MGET', unpack(found))
"""
"""The heartbeats listed in index KEYS[1] (false for those expired)."""


def read_live(redis: Redis, pattern: str, kind: type[Beat]) -> list[Beat]:
    """Every heartbeat of `pattern`'s kind that has not expired (one round trip, however many keys
    Redis holds)."""
    beats = redis.register_script(_READ_LIVE)(keys=[index_of(pattern)])
    return [kind.model_validate_json(raw) for raw in beats if raw is not None]


class Heartbeat:
    """Publishes `snapshot()` under `key` every `interval` seconds from a daemon thread.

    A thread, because RQ's no-fork worker sends no heartbeat of its own while a job runs.
    """

    def __init__(self, redis: Redis, key: str, snapshot: Callable[[], BaseModel], interval: float, ttl: int):
        self._redis, self._key, self._snapshot = redis, key, snapshot
        self._interval, self._ttl = interval, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat:{key}", daemon=True)

    def start(self) -> None:
        """Publish now, then keep publishing in the background."""
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        """Publish the current snapshot at once; a failure is logged, never raised (the thread must
        outlive it: a process whose heartbeat stops is taken for dead and its jobs handed back)."""
        try:
            publish(self._redis, self._key, self._snapshot(), self._ttl)
        except RedisError as exc:
            log.warning("heartbeat_failed", key=self._key, error=str(exc))
        except Exception:  # a snapshot that could not be taken this time; the next one may be
            log.exception("heartbeat_failed", key=self._key)

    def stop(self) -> None:
        """Stop publishing and remove the key, so readiness drops at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 1)
        try:
            withdraw(self._redis, self._key)
        except RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()
