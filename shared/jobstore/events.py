"""A job's event stream, its protocol in one place: the event names, the one writer (a worker's
`JobStream`, a cache hit's `write_whole`, the reaper's `append`) and the one reader (`follow`, used by
the SSE relay, the OpenAI endpoints and the sync wait).

Each entry holds `event` (its kind) and `data` (JSON). A run's events are `start`, `token`s (a
`channel`, its `text`, the `index` of its first piece), then `done` (the result and timings) or
`error` (`code`, `message`); `retry` says the job went back to its queue and starts over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.response_cache import channel_texts

log = structlog.get_logger()

START = "start"
TOKEN = "token"
DONE = "done"
ERROR = "error"
RETRY = "retry"

ENDINGS = (DONE, ERROR)
"""Events after which a job's stream gets no more."""

BLOCK_MS = 1000
"""Milliseconds one XREAD of `follow` waits: how soon a closed connection is noticed."""

BATCH = 200
"""Stream entries `follow` reads at once."""

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
            log.warning("stream_write_failed", stream_event=TOKEN, error=str(exc))


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
        self._add(START, data)

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
        self._add(DONE, {**result, "timings": timings})

    def error(self, code: str, message: str) -> None:
        """The job failed."""
        self._flush()
        self._add(ERROR, {"code": code, "message": message})

    def _flush(self) -> None:
        if not self._pending:
            return
        data = {"channel": self._channel, "text": "".join(self._pending), "index": self._index}
        self._index += len(self._pending)
        self._pending = []
        self._add(TOKEN, data)

    def _add(self, event: str, data: dict[str, Any]) -> None:
        if self._buffer is not None:
            if event == TOKEN:
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


def append(redis: Redis, job_id: str, event: str, data: dict[str, Any], ttl: int = keys.STREAM_TTL) -> None:
    """One event written outside a run (the reaper's `retry` or `error` for a lost worker's job)."""
    key = keys.job_stream(job_id)
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, {"event": event, "data": json.dumps(data)})
    pipe.expire(key, ttl)
    pipe.execute()


def write_whole(redis: Redis, job_id: str, result: dict[str, Any], timings: dict[str, Any], ttl: int) -> None:
    """A finished job's whole stream at once (start, each channel's text as one token event, done),
    in a run's format, so followers answer a cache hit without waiting."""
    entries: list[tuple[str, dict[str, Any]]] = [
        (START, {"model": result.get("model"), "queue": result.get("queue"), "cache": "hit"})
    ]
    for index, (channel, text) in enumerate(channel_texts(result)):
        entries.append((TOKEN, {"channel": channel, "text": text, "index": index}))
    entries.append((DONE, {**result, "timings": timings}))
    key = keys.job_stream(job_id)
    pipe = redis.pipeline(transaction=False)
    for event, data in entries:
        pipe.xadd(key, {"event": event, "data": json.dumps(data)})
    pipe.expire(key, ttl)
    pipe.execute()


@dataclass(frozen=True)
class JobEvent:
    """One event of a job, with its data."""

    kind: str
    data: dict[str, Any]
    id: str | None = None
    """The stream entry's id (resume after it with Last-Event-ID); None for an ending read from the job."""


def follow(
    redis: Redis,
    job_id: str,
    client_gone: Callable[[], bool],
    ending: Callable[[], JobEvent | None],
    after: str = "0-0",
) -> Iterator[JobEvent | None]:
    """The job's events after stream entry `after` (from its first by default), until `done` or
    `error`; None after each empty block (a chance to send a keep-alive), after which `ending()` says
    whether the job ended without (more) events. Raises ClientGone once `client_gone()` is true."""
    key = keys.job_stream(job_id)
    while True:
        if client_gone():
            raise ClientGone(job_id)
        read: Any = redis.xread({key: after}, count=BATCH, block=BLOCK_MS)
        entries = read[0][1] if read else []
        for entry_id, fields in entries:
            after = _text(entry_id)
            event = JobEvent(_text(fields[b"event"]), json.loads(fields[b"data"]), after)
            yield event
            if event.kind in ENDINGS:
                return
        if entries:
            continue
        last = ending()
        if last is not None:
            yield last
            return
        yield None


class ClientGone(Exception):
    """The client closed its connection while waiting."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
