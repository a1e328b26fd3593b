"""A job's event stream, its protocol in one place: the event names, the one writer (a worker's
`JobStream`, a cache hit's `write_whole`, a state change's `add_to`) and the one reader (`follow`, used by
the SSE relay, the OpenAI endpoints and the sync wait).

Each entry holds `event` (its kind) and `data` (JSON). A run's events are `start`, `token`s (a
`channel`, its `text`, the `index` of its first piece), then `done` (the result and timings) or
`error` (`code`, `message`); `retry` says the job went back to its queue and starts over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.jobstore.hub import StreamHub
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


FENCED_XADD = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[3], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
"""Append one event to a run's stream only while the run holds the job's fence (KEYS: the fence, the
stream; ARGV: the run's token ('' for an unfenced writer), the TTL, the event, its data)."""


@dataclass(frozen=True)
class Fence:
    """A run's fencing token: its writes count only while the job's fence key holds it."""

    key: str
    token: int


class EventBuffer:
    """Token events of many streams, written in one round trip: a batch flushes it once per decode
    step instead of one round trip per row and token. A stream whose run lost its fence is marked
    `superseded` (its worker drops the row)."""

    def __init__(self, redis: Redis):
        self._redis = redis
        self._script = redis.register_script(FENCED_XADD)
        self._events: list[tuple[JobStream, str, str]] = []

    def add(self, stream: JobStream, event: str, data: str) -> None:
        """Hold one event of `stream` until the next flush."""
        self._events.append((stream, event, data))

    def flush(self) -> None:
        """Write every held event, in order."""
        if not self._events:
            return
        events, self._events = self._events, []
        try:
            pipe = self._redis.pipeline(transaction=False)
            for stream, event, data in events:
                self._script(keys=stream.script_keys, args=stream.script_args(event, data), client=pipe)
            written = pipe.execute()
        except RedisError as exc:
            log.warning("stream_write_failed", stream_event=TOKEN, error=str(exc))
            return
        for (stream, _, _), ok in zip(events, written, strict=True):
            if not ok:
                stream.superseded = True


class JobStream:
    """Writes one run's events; each entry holds `event` (its kind) and `data` (JSON).

    With a `fence`, each write counts only while the run holds it: once the job was handed back (or
    another run started) the stream refuses the write and says `superseded`. A Redis failure never
    fails the job: only the stream is short. With a `buffer`, token events wait in it until it is
    flushed; any other event flushes it first, so the stream keeps its order. The run's last event
    (`done` or `error`) is written by the transaction that settles the job (`ending`).
    """

    def __init__(
        self,
        redis: Redis,
        job_id: str,
        group_tokens: int = GROUP_TOKENS,
        ttl: int = keys.STREAM_TTL,
        buffer: EventBuffer | None = None,
        fence: Fence | None = None,
    ):
        self._redis, self._key, self.ttl = redis, keys.job_stream(job_id), ttl
        self._buffer = buffer
        self._group = group_tokens
        self._pending: list[str] = []
        self._logprobs: list[dict[str, Any]] | None = None
        self._channel: str | None = None
        self._index = 0
        self.fence = fence
        self.superseded = False
        self._script = redis.register_script(FENCED_XADD)

    @property
    def key(self) -> str:
        """The stream's Redis key."""
        return self._key

    @property
    def script_keys(self) -> list[str]:
        """The keys a fenced write of this stream reads and writes."""
        return [self.fence.key if self.fence is not None else self.key, self.key]

    def script_args(self, event: str, data: str) -> list[Any]:
        """The arguments of a fenced write of `event`."""
        return [str(self.fence.token) if self.fence is not None else "", self.ttl, event, data]

    def start(self, **data: Any) -> None:
        """The run started on a worker."""
        self._add(START, data)

    def text(self, channel: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        """New text of `channel` (the model's tokens, with their `logprobs` when asked), sent in
        groups of `group_tokens` pieces."""
        if self._channel is not None and channel != self._channel:
            self._flush()
        self._channel = channel
        self._pending.append(text)
        if logprobs is not None:
            self._logprobs = [*(self._logprobs or []), *logprobs]
        if len(self._pending) >= self._group:
            self._flush()

    def done(self, result: dict[str, Any], timings: dict[str, Any]) -> None:
        """Write the run's `done` event at once (a writer that settles the job some other way)."""
        self._flush()
        self._add(DONE, {**result, "timings": timings})

    def error(self, code: str, message: str) -> None:
        """Write the run's `error` event at once (a writer that settles the job some other way)."""
        self._flush()
        self._add(ERROR, {"code": code, "message": message})

    def ending(self, event: str, data: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """The run's last event (`done` or `error`), for the transaction that settles the job to
        append: every token event before it is written first."""
        self._flush()
        if self._buffer is not None:
            self._buffer.flush()
        return self.key, {"event": event, "data": json.dumps(data)}

    def _flush(self) -> None:
        if not self._pending:
            return
        data: dict[str, Any] = {
            "channel": self._channel,
            "text": "".join(self._pending),
            "index": self._index,
        }
        if self._logprobs is not None:
            data["logprobs"], self._logprobs = self._logprobs, None
        self._index += len(self._pending)
        self._pending = []
        self._add(TOKEN, data)

    def _add(self, event: str, data: dict[str, Any]) -> None:
        if self.superseded:
            return
        if self._buffer is not None:
            if event == TOKEN:
                self._buffer.add(self, event, json.dumps(data))
                return
            self._buffer.flush()
        try:
            if not self._script(keys=self.script_keys, args=self.script_args(event, json.dumps(data))):
                self.superseded = True
        except RedisError as exc:
            log.warning("stream_write_failed", stream_event=event, error=str(exc))


def add_to(pipe: Any, job_id: str, event: str, data: dict[str, Any], ttl: int = keys.STREAM_TTL) -> None:
    """Queue one event of the job's stream on `pipe`, in the transaction of a state change (the
    reaper's `retry`, or `error` for a job out of retries)."""
    key = keys.job_stream(job_id)
    pipe.xadd(key, {"event": event, "data": json.dumps(data)})
    pipe.expire(key, ttl)


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
    source: Redis | StreamHub,
    job_id: str,
    client_gone: Callable[[], bool],
    ending: Callable[[], JobEvent | None],
    after: str = "0-0",
    idle_ms: int = BLOCK_MS,
) -> Iterator[JobEvent | None]:
    """The job's events after stream entry `after` (from its first by default), until `done` or
    `error`; None after each block of `idle_ms` without any (a chance to send a keep-alive), after
    which `ending()` says whether the job ended without (more) events. Raises ClientGone once
    `client_gone()` is true.

    `source` is a Redis client (this follower blocks one of its connections) or the process's
    `StreamHub` (one connection reads for every follower)."""
    key = keys.job_stream(job_id)
    with _reading(source, key, after, idle_ms) as read:
        while True:
            if client_gone():
                raise ClientGone(job_id)
            entries = read()
            for entry_id, fields in entries:
                event = JobEvent(_text(fields[b"event"]), json.loads(fields[b"data"]), _text(entry_id))
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


@contextmanager
def _reading(
    source: Redis | StreamHub, key: str, after: str, idle_ms: int
) -> Iterator[Callable[[], list[Any]]]:
    """A function giving the stream's next entries (empty after a block of `idle_ms` without any)."""
    if isinstance(source, StreamHub):
        with source.subscribe(key, after) as subscription:
            yield lambda: subscription.take(idle_ms / 1000)
        return
    cursor = [after]

    def read() -> list[Any]:
        got: Any = source.xread({key: cursor[0]}, count=BATCH, block=idle_ms)
        entries = got[0][1] if got else []
        if entries:
            cursor[0] = _text(entries[-1][0])
        return list(entries)

    yield read


DIVERGED = "attempt_diverged"
"""The error code of a stream whose new run did not repeat what a client was already sent."""


class AttemptRelay:
    """What a client may see of a job's events across its runs. A job handed back (`retry`) runs
    again from the start; the client is never sent a second run's text after the first's. The new
    run's tokens are checked, piece by piece, to repeat what the client was sent of each channel,
    and only text beyond it goes out; where they differ (a sampled request, or numerics of another
    batch), the stream ends with an `attempt_diverged` error instead, so a streamed text never
    differs silently from the stored result."""

    def __init__(self) -> None:
        self._sent: dict[str, str] = {}  # channel -> the text the client was sent
        self._checked: dict[str, int] | None = None  # in a later run: channel -> characters repeated
        self._channel: str | None = None
        self._started = False

    def feed(self, event: JobEvent) -> list[JobEvent]:
        """The events the client gets for `event` (none, it, part of it, or a divergence)."""
        if event.kind == RETRY:
            self._checked, self._channel = {}, None
            return []
        if event.kind == START:
            first = not self._started
            self._started = True
            return [event] if first else []
        if event.kind == TOKEN:
            return self._token(event)
        if event.kind == DONE and self._checked is not None and not self._repeated_all():
            return [self._diverged(event)]
        return [event]

    def _token(self, event: JobEvent) -> list[JobEvent]:
        channel, text = str(event.data.get("channel")), str(event.data.get("text", ""))
        sent = self._sent.get(channel, "")
        if self._checked is None:
            self._sent[channel] = sent + text
            return [event]
        if self._channel is not None and channel != self._channel and not self._repeated(self._channel):
            return [self._diverged(event)]  # the new run left a channel before repeating it all
        self._channel = channel
        done = self._checked.get(channel, 0)
        overlap = sent[done : done + len(text)]
        if not text.startswith(overlap):
            return [self._diverged(event)]
        self._checked[channel] = done + len(text)
        fresh = text[len(overlap) :]
        if not fresh:
            return []
        self._sent[channel] = sent + fresh
        return [JobEvent(TOKEN, {**event.data, "text": fresh}, event.id)]

    def _repeated(self, channel: str) -> bool:
        return self._checked is not None and self._checked.get(channel, 0) >= len(self._sent.get(channel, ""))

    def _repeated_all(self) -> bool:
        return all(self._repeated(channel) for channel in self._sent)

    def _diverged(self, event: JobEvent) -> JobEvent:
        message = "The job was retried after its worker was lost, and its new run did not repeat the text "
        message += "already streamed; the stored result differs from it. Fetch the job for its result."
        return JobEvent(ERROR, {"code": DIVERGED, "message": message}, event.id)


def follow_runs(
    source: Redis | StreamHub,
    job_id: str,
    client_gone: Callable[[], bool],
    ending: Callable[[], JobEvent | None],
    after: str = "0-0",
    idle_ms: int = BLOCK_MS,
) -> Iterator[JobEvent | None]:
    """`follow` through an `AttemptRelay`: the job's events as one consistent run, resumable after
    a stream entry id `after` (the relay reads from the first entry and skips what was sent)."""
    relay, skip = AttemptRelay(), _entry_id(after)
    for event in follow(source, job_id, client_gone, ending, idle_ms=idle_ms):
        if event is None:
            yield None
            continue
        for out in relay.feed(event):
            if out.id is None or _entry_id(out.id) > skip:
                yield out
            if out.kind in ENDINGS:
                return


def _entry_id(value: str) -> tuple[int, int]:
    """A stream entry id as numbers, for ordering ("0-0" before every entry)."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


class ClientGone(Exception):
    """The client closed its connection while waiting."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
