"""Where files live: one small interface (`FileStore`) and its Redis backend. Files are JSONL, kept
as a list of lines, written as they arrive and read in chunks, so neither an upload nor a download
ever holds a whole file in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from redis import Redis

from shared import keys
from shared.batches.records import StoredFile, text_of

UPLOAD_TTL = 3600
"""Seconds the lines of an upload under way live before it finishes (an upload cut off leaves
nothing for longer)."""

WRITE_CHUNK = 256
"""Lines an upload sends to Redis in one round trip."""

READ_CHUNK = 512
"""Lines a download or the feeder reads in one round trip."""


@dataclass(frozen=True)
class Usage:
    """What one tenant's files take: how many, their bytes, and when the next one expires."""

    files: int
    bytes: int
    next_expiry: int | None


class Upload(Protocol):
    """A file being written, line by line; visible once `finish` is called."""

    def append(self, line: str) -> None: ...
    def finish(self) -> StoredFile: ...
    def abort(self) -> None: ...


class FileStore(Protocol):
    """Storage of JSONL files per tenant: written by line, read in chunks, listed, deleted."""

    def begin(self, file: StoredFile, on_write: Callable[[], object] | None = None) -> Upload: ...
    def get(self, tenant: str, file_id: str) -> StoredFile | None: ...
    def lines(self, tenant: str, file_id: str, start: int, count: int) -> list[str]: ...
    def iter_lines(self, tenant: str, file_id: str) -> Iterator[str]: ...
    def page(
        self, tenant: str, limit: int, after: str | None, order: Literal["asc", "desc"], purpose: str | None
    ) -> tuple[list[StoredFile], bool]: ...
    def delete(self, tenant: str, file_id: str) -> bool: ...
    def usage(self, tenant: str) -> Usage: ...


class RedisUpload:
    """An upload into Redis: lines pushed WRITE_CHUNK at a time onto a list with a short TTL; the
    file's hash and its place in the tenant's index written at `finish`, in one transaction."""

    def __init__(self, redis: Redis, file: StoredFile, on_write: Callable[[], object] | None = None):
        self._redis, self._file, self._on_write = redis, file, on_write
        self._key = keys.file_lines(file.tenant, file.id)
        self._pending: list[str] = []
        self._started = False

    def append(self, line: str) -> None:
        self._pending.append(line)
        self._file.bytes += len(line.encode()) + 1  # each line ends with a newline in the content
        self._file.lines += 1
        if len(self._pending) >= WRITE_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._on_write is not None:
            self._on_write()
        pipe = self._redis.pipeline(transaction=False)
        pipe.rpush(self._key, *self._pending)
        if not self._started:
            pipe.expire(self._key, UPLOAD_TTL)
            self._started = True
        pipe.execute()
        self._pending = []

    def finish(self) -> StoredFile:
        self._flush()
        if self._on_write is not None:
            self._on_write()
        file = self._file
        meta = keys.file_meta(file.tenant, file.id)
        pipe = self._redis.pipeline()
        pipe.hset(meta, mapping=file.to_hash())  # type: ignore[arg-type]
        if file.expires_at is not None:
            pipe.expireat(meta, file.expires_at)
            pipe.expireat(self._key, file.expires_at)
        else:
            pipe.persist(self._key)
        pipe.zadd(keys.tenant_files(file.tenant), {file.id: file.created_at})
        pipe.execute()
        return file

    def abort(self) -> None:
        self._pending = []
        self._redis.delete(self._key)


class RedisFileStore:
    """Files in Redis: every process then needs only Redis (DESIGN's scaling rule), and the quota
    and the file TTLs bound what it holds."""

    def __init__(self, redis: Redis):
        self._redis = redis

    def begin(self, file: StoredFile, on_write: Callable[[], object] | None = None) -> RedisUpload:
        """A new upload of `file` (its fields as they will be; bytes and lines counted as it goes);
        `on_write` runs before each write (the API gives each its own Redis budget)."""
        return RedisUpload(self._redis, file, on_write)

    def get(self, tenant: str, file_id: str) -> StoredFile | None:
        """`tenant`'s file `file_id`, or None (unknown, expired, deleted, or another tenant's)."""
        raw = self._redis.hgetall(keys.file_meta(tenant, file_id))
        return StoredFile.from_hash(raw) if raw else None

    def lines(self, tenant: str, file_id: str, start: int, count: int) -> list[str]:
        """Up to `count` lines from line `start` (0-based)."""
        raw = self._redis.lrange(keys.file_lines(tenant, file_id), start, start + count - 1)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    def iter_lines(self, tenant: str, file_id: str) -> Iterator[str]:
        """Every line of the file, READ_CHUNK at a time."""
        start = 0
        while chunk := self.lines(tenant, file_id, start, READ_CHUNK):
            yield from chunk
            start += len(chunk)

    def page(
        self,
        tenant: str,
        limit: int,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        purpose: str | None = None,
    ) -> tuple[list[StoredFile], bool]:
        """Up to `limit` of `tenant`'s files by created_at (`order`), after the id `after`; and
        whether more follow. Ids whose file expired leave the index here."""
        index = keys.tenant_files(tenant)
        found = self._live(tenant, [text_of(i) for i in self._ordered(index, order)])
        if purpose is not None:
            found = [f for f in found if f.purpose == purpose]
        ids = [f.id for f in found]
        start = ids.index(after) + 1 if after in ids else 0
        return found[start : start + limit], len(found) > start + limit

    def _ordered(self, index: str, order: str) -> list[bytes]:
        # The index holds at most the tenant's file quota (plus batch outputs): read whole.
        return self._redis.zrange(index, 0, -1, desc=order == "desc")  # type: ignore[return-value]

    def _live(self, tenant: str, ids: list[str]) -> list[StoredFile]:
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for file_id in ids:
            pipe.hgetall(keys.file_meta(tenant, file_id))
        found, gone = [], []
        for file_id, raw in zip(ids, pipe.execute(), strict=True):
            if raw:
                found.append(StoredFile.from_hash(raw))
            else:
                gone.append(file_id)
        if gone:
            self._redis.zrem(keys.tenant_files(tenant), *gone)
        return found

    def delete(self, tenant: str, file_id: str) -> bool:
        """Delete the file; False when there was none."""
        pipe = self._redis.pipeline()
        pipe.delete(keys.file_meta(tenant, file_id), keys.file_lines(tenant, file_id))
        pipe.zrem(keys.tenant_files(tenant), file_id)
        removed, _ = pipe.execute()
        return bool(removed)

    def usage(self, tenant: str) -> Usage:
        """The files `tenant` holds now, and their bytes."""
        files = self._live(tenant, [text_of(i) for i in self._ordered(keys.tenant_files(tenant), "asc")])
        expiries = [f.expires_at for f in files if f.expires_at is not None]
        return Usage(len(files), sum(f.bytes for f in files), min(expiries) if expiries else None)
