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


class JobStream:
    """Writes one job's events; each entry holds `event` (its kind) and `data` (JSON).

    A Redis failure never fails the job: the result is still stored, only the stream is short.
    """

    def __init__(
        self, redis: Redis, job_id: str, group_tokens: int = GROUP_TOKENS, ttl: int = keys.STREAM_TTL
    ):
        self._redis, self._key, self._ttl = redis, keys.job_stream(job_id), ttl
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
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._key, {"event": event, "data": json.dumps(data)})
            pipe.expire(self._key, self._ttl)
            pipe.execute()
        except RedisError as exc:
            log.warning("stream_write_failed", event=event, error=str(exc))
