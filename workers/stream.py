"""A job's event stream: the worker appends start, token deltas, done or error to a Redis stream."""

from __future__ import annotations

import json
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError

from shared import keys

log = structlog.get_logger()

EVENT_START = "start"
EVENT_TOKEN = "token"
EVENT_DONE = "done"
EVENT_ERROR = "error"

GROUP_TOKENS = 1
"""Text pieces gathered into one token event (one a token: a local Redis takes ~0.1 ms an XADD)."""


class EventBuffer:
    """Token events of many streams, written in one round trip: a batch flushes it once per decode
    step instead of one round trip per row and token."""

    def __init__(self, redis: Redis):
        self._redis = redis
        self._events: list[tuple[str, str, str, int]] = []

    def add(self, key: str, event: str, data: str, ttl: int) -> None:
        """Hold one event until the next flush."""
        self._events.append((key, event, data, ttl))

    def flush(self) -> None:
        """Write every held event, in order."""
        if not self._events:
            return
        events, self._events = self._events, []
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, event, data, ttl in events:
                pipe.xadd(key, {"event": event, "data": data})
                pipe.expire(key, ttl)
            pipe.execute()
        except RedisError as exc:
            log.warning("stream_write_failed", stream_event=EVENT_TOKEN, error=str(exc))


class JobStream:
    """Writes one job's events; each entry holds `event` (its kind) and `data` (JSON).

    A Redis failure never fails the job: the result is still stored, only the stream is short.
    With a `buffer`, token events wait in it until it is flushed; any other event flushes it first,
    so the stream keeps its order.
    """

    def __init__(
        self,
        redis: Redis,
        job_id: str,
        group_tokens: int = GROUP_TOKENS,
        ttl: int = keys.STREAM_TTL,
        buffer: EventBuffer | None = None,
    ):
        self._redis, self._key, self._ttl = redis, keys.job_stream(job_id), ttl
        self._buffer = buffer
        self._group = group_tokens
        self._pending: list[str] = []
        self._channel: str | None = None
        self._index = 0

    def start(self, **data: Any) -> None:
        """The job started on a worker."""
        self._add(EVENT_START, data)

    def text(self, channel: str, text: str) -> None:
        """New text of `channel` (the model's tokens), sent in groups of `group_tokens` pieces."""
        if self._channel is not None and channel != self._channel:
            self._flush()
        self._channel = channel
        self._pending.append(text)
        if len(self._pending) >= self._group:
            self._flush()

    def done(self, result: dict[str, Any], timings: dict[str, Any]) -> None:
        """The job finished: its result (text, reasoning, usage, finish reason) and timings."""
        self._flush()
        self._add(EVENT_DONE, {**result, "timings": timings})

    def error(self, code: str, message: str) -> None:
        """The job failed."""
        self._flush()
        self._add(EVENT_ERROR, {"code": code, "message": message})

    def _flush(self) -> None:
        if not self._pending:
            return
        data = {"channel": self._channel, "text": "".join(self._pending), "index": self._index}
        self._index += len(self._pending)
        self._pending = []
        self._add(EVENT_TOKEN, data)

    def _add(self, event: str, data: dict[str, Any]) -> None:
        if self._buffer is not None:
            if event == EVENT_TOKEN:
                self._buffer.add(self._key, event, json.dumps(data), self._ttl)
                return
            self._buffer.flush()
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._key, {"event": event, "data": json.dumps(data)})
            pipe.expire(self._key, self._ttl)
            pipe.execute()
        except RedisError as exc:
            log.warning("stream_write_failed", stream_event=event, error=str(exc))
