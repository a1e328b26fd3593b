"""One reader of job event streams for a whole process: every follower of a stream (an SSE relay,
a streamed or synchronous completion) subscribes here, and one loop reads all their streams with a
single XREAD BLOCK, so a thousand open streams hold one Redis connection, not a thousand.

The loop runs in a thread of its own (a greenlet where the API runs under gevent: the standard
library is patched, so `threading` and `queue` here are cooperative). A subscription keeps its own
cursor, advanced by the loop as it hands entries over: entries that arrive while its follower is busy
are read on the next round, and nothing is lost because the Redis stream itself is the buffer.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError

from shared import keys

log = structlog.get_logger()

HUB_BLOCK_MS = 100
"""Milliseconds one round of the reader blocks (a stream already read wakes the round as soon as it
gets an entry; a new subscription wakes it through the hub's wake stream)."""

HUB_BATCH = 200
"""Entries read per stream per round; a subscription holding this many unread is skipped until its
follower catches up (a slow client cannot make the process buffer a whole stream)."""

RETRY_AFTER_ERROR = 0.5
"""Seconds the reader waits after a failed round (Redis down) before trying again."""

Entry = tuple[str, dict[bytes, bytes]]
"""A stream entry as XREAD returns it: its id and its fields."""


class Subscription:
    """One follower's view of one stream: the entries after its cursor, in order."""

    def __init__(self, key: str, after: str):
        self.key = key
        self.cursor = after
        """The id of the last entry handed over (read and write only under the hub's lock)."""
        self._entries: queue.Queue[list[Entry]] = queue.Queue()
        self.unread = 0

    def take(self, timeout: float) -> list[Entry]:
        """The entries that arrived since the last take, waiting up to `timeout` seconds for some."""
        try:
            batch = self._entries.get(timeout=timeout)
        except queue.Empty:
            return []
        while True:  # everything already handed over, in one list
            try:
                batch += self._entries.get_nowait()
            except queue.Empty:
                break
        self.unread = max(0, self.unread - len(batch))
        return batch

    def hand(self, entries: list[Entry]) -> None:
        """Called by the reader: new entries for the follower."""
        self.cursor = entries[-1][0]
        self.unread += len(entries)
        self._entries.put(entries)


class StreamHub:
    """Reads every subscribed stream of this process in one loop over `redis` (a client outside any
    request's budget: its reads block by design)."""

    def __init__(self, redis: Redis, block_ms: int = HUB_BLOCK_MS):
        self._redis = redis
        self._block_ms = block_ms
        self._lock = threading.Condition()
        self._subscriptions: set[Subscription] = set()
        self._reader: threading.Thread | None = None
        self._closed = False
        self._reading = False  # a round's XREAD is blocking: a new follower wakes it
        self._wake = keys.hub_wake(uuid.uuid4().hex)
        self.rounds = 0
        """Rounds read so far (for tests and the bench)."""

    @contextmanager
    def subscribe(self, key: str, after: str) -> Iterator[Subscription]:
        """Follow stream `key` after entry `after` for as long as the block lasts."""
        subscription = Subscription(key, after)
        with self._lock:
            self._subscriptions.add(subscription)
            if self._reader is None or not self._reader.is_alive():
                self._reader = threading.Thread(target=self._read, name="gptoss-stream-hub", daemon=True)
                self._reader.start()
            self._lock.notify_all()
            reading = self._reading
        if reading:
            self._wake_round()
        try:
            yield subscription
        finally:
            with self._lock:
                self._subscriptions.discard(subscription)

    def close(self) -> None:
        """Stop reading (after the round under way); subscriptions get nothing more."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._reader is not None:
            self._reader.join(5)

    @property
    def open(self) -> int:
        """Subscriptions open now."""
        return len(self._subscriptions)

    def _read(self) -> None:
        while True:
            with self._lock:
                while not self._subscriptions and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                wanted = self._cursors()
            if not wanted:  # every follower is behind: let them catch up
                time.sleep(self._block_ms / 1000)
                continue
            try:
                self._reading = True
                read: Any = self._redis.xread(
                    {**wanted, self._wake: "$"}, count=HUB_BATCH, block=self._block_ms
                )
            except RedisError as exc:
                log.warning("stream_hub_read_failed", error=str(exc), streams=len(wanted))
                time.sleep(RETRY_AFTER_ERROR)
                continue
            finally:
                self._reading = False
            self.rounds += 1
            if read:
                self._hand_over(read, wanted)

    def _wake_round(self) -> None:
        """End the round under way now (its streams are read again with the new follower's); a lost
        wake costs only the rest of the round's block."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._wake, {"w": 1}, maxlen=1)
            pipe.expire(self._wake, keys.HUB_WAKE_TTL)
            pipe.execute()
        except RedisError as exc:
            log.warning("stream_hub_wake_failed", error=str(exc))

    def _cursors(self) -> dict[Any, Any]:
        """Each stream to read, from the earliest cursor of its followers that are not behind."""
        wanted: dict[Any, Any] = {}
        for subscription in self._subscriptions:
            if subscription.unread >= HUB_BATCH:
                continue
            cursor = wanted.get(subscription.key)
            if cursor is None or _entry_id(subscription.cursor) < _entry_id(cursor):
                wanted[subscription.key] = subscription.cursor
        return wanted

    def _hand_over(self, read: list[Any], wanted: dict[Any, Any]) -> None:
        with self._lock:
            by_key: dict[str, list[Subscription]] = {}
            for subscription in self._subscriptions:
                by_key.setdefault(subscription.key, []).append(subscription)
            for raw_key, raw_entries in read:
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                entries = [(_text(entry_id), fields) for entry_id, fields in raw_entries]
                start = _entry_id(_text(wanted.get(key, "0-0")))
                for subscription in by_key.get(key, []):
                    after = _entry_id(subscription.cursor)
                    if after < start:  # subscribed during the round, behind where it read: a gap
                        continue  # its own cursor is read from in the next round
                    fresh = [entry for entry in entries if _entry_id(entry[0]) > after]
                    if fresh:
                        subscription.hand(fresh)


def _entry_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
