"""A batch's state in Redis and every change of it, each one Lua script (atomic): the API creates
and cancels; feeders (one per scheduler, any number) claim lines, settle them, and move the status.

Each claimed line sits in the batch's `open` hash (line -> `c:<claimed at>`, then `j:<job id>` once
its job exists) until it is settled: settling deletes it and, only if it was there, appends the
line's output or error line and counts it, in the same script. So each line is written exactly
once, whichever feeder sees its job end first, and a feeder that restarts loses nothing.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from redis import Redis
from redis.client import Pipeline

from shared import keys
from shared.batches.records import BATCH_ENDED, StoredBatch, StoredFile, text_of

CLAIMED, RELEASED = "c:", "j:"
"""Prefixes of an open line's value: `c:<claimed at>` (unix seconds), or `j:<job id>:<custom_id>`
once released as a job (RQ's job ids hold no `:`)."""

_CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return {-1, 0} end
if (redis.call('HGET', KEYS[1], 'stop') or '') ~= '' then return {-1, 0} end
local cursor = tonumber(redis.call('HGET', KEYS[1], 'cursor') or '0')
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local count = math.min(tonumber(ARGV[1]), total - cursor)
if count <= 0 then return {cursor, 0} end
redis.call('HSET', KEYS[1], 'cursor', cursor + count)
for line = cursor, cursor + count - 1 do redis.call('HSET', KEYS[2], line, 'c:' .. ARGV[2]) end
return {cursor, count}
"""
"""Claim up to ARGV[1] lines from the cursor of batch KEYS[1] (open hash KEYS[2]) while it runs."""

_RECLAIM = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
"""Take over an open line whose claim (ARGV[2]) went stale: its feeder died before its job existed."""

_FILE = """
local function append(meta, list, index, lines, first, file)
  if redis.call('EXISTS', meta) == 0 then
    redis.call('HSET', meta, 'id', file[1], 'tenant', file[2], 'purpose', 'batch_output',
      'filename', file[3], 'created_at', file[4], 'expires_at', file[5], 'status', 'processed',
      'bytes', 0, 'lines', 0, 'urls', '[]')
    redis.call('EXPIREAT', meta, file[5])
    redis.call('ZADD', index, file[4], file[1])
  end
  local bytes = 0
  for i = first, #lines do
    redis.call('RPUSH', list, lines[i])
    bytes = bytes + string.len(lines[i]) + 1
  end
  redis.call('EXPIREAT', list, file[5])
  redis.call('HINCRBY', meta, 'bytes', bytes)
  redis.call('HINCRBY', meta, 'lines', #lines - first + 1)
end
"""
"""Append ARGV lines to an output or error file, creating its hash (and index entry) with the first."""

_SETTLE = (
    _FILE
    + """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
append(KEYS[3], KEYS[4], KEYS[5], ARGV, 9, {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]})
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
return 1
"""
)
"""Settle open line ARGV[1] of batch KEYS[1]: only if it is still open (KEYS[2]), append ARGV[9] to
the file (KEYS[3] hash, KEYS[4] lines, KEYS[5] index) and count it (ARGV[2], ARGV[3])."""

_UNRUN = (
    _FILE
    + """
if tonumber(redis.call('HGET', KEYS[1], 'cursor') or '0') ~= tonumber(ARGV[1]) then return 0 end
local count = #ARGV - 6
redis.call('HSET', KEYS[1], 'cursor', tonumber(ARGV[1]) + count)
append(KEYS[2], KEYS[3], KEYS[4], ARGV, 7, {ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]})
redis.call('HINCRBY', KEYS[1], 'failed', count)
redis.call('HINCRBY', KEYS[1], 'errors_written', count)
return count
"""
)
"""Write the error lines ARGV[7..] of the unclaimed lines from cursor ARGV[1] on, moving the cursor
past them (only if no one did first)."""

_ADVANCE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == status then allowed = true end end
if not allowed then return 0 end
if ARGV[5] ~= '' then
  if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
  local cursor = tonumber(redis.call('HGET', KEYS[1], 'cursor') or '0')
  if ARGV[5] == 'all' and cursor < tonumber(redis.call('HGET', KEYS[1], 'total') or '0') then return 0 end
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[6]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[7])
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[4], ARGV[8], ARGV[9]) end
end
return 1
"""
"""Move batch KEYS[1] from one of the statuses ARGV[1] to ARGV[2], stamping ARGV[3] = ARGV[4] (and
the field pairs ARGV[10..]); with ARGV[5] `open`/`all`, only once no line is open (and all are
claimed). Ending it (ARGV[6] its TTL): out of the active set, its webhook in the outbox."""

_STOP = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
if (redis.call('HGET', KEYS[1], 'stop') or '') ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'stop', ARGV[1])
return 1
"""
"""Stop releasing lines of a running batch (ARGV[1]: why, e.g. `expire`)."""

Settled = Literal["completed", "failed"]


def member(tenant: str, batch_id: str) -> str:
    """The batch's member in the active set (sorted by name: a tenant's batches are one range)."""
    return keys.scoped(tenant, batch_id)


def parse_member(value: str) -> tuple[str, str]:
    """The tenant and batch id of an active set member."""
    from urllib.parse import unquote

    tenant, _, batch_id = value.partition(":")
    return unquote(tenant), unquote(batch_id)


class BatchLedger:
    """Reads and changes batches in Redis (one Lua script per change)."""

    def __init__(self, redis: Redis):
        self._redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._reclaim = redis.register_script(_RECLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._unrun = redis.register_script(_UNRUN)
        self._advance = redis.register_script(_ADVANCE)
        self._stop = redis.register_script(_STOP)

    def create(self, batch: StoredBatch, index_ttl: int) -> None:
        """Store a new batch, in its tenant's index and the active set."""
        pipe = self._redis.pipeline()
        pipe.hset(keys.batch(batch.tenant, batch.id), mapping=batch.to_hash())  # type: ignore[arg-type]
        index = keys.tenant_batches(batch.tenant)
        pipe.zadd(index, {batch.id: batch.created_at})
        pipe.expire(index, index_ttl)
        pipe.zadd(keys.ACTIVE_BATCHES, {member(batch.tenant, batch.id): 0})
        pipe.execute()

    def get(self, tenant: str, batch_id: str) -> StoredBatch | None:
        raw = self._redis.hgetall(keys.batch(tenant, batch_id))
        return StoredBatch.from_hash(raw) if raw else None

    def page(self, tenant: str, limit: int, after: str | None) -> tuple[list[StoredBatch], bool]:
        """Up to `limit` of `tenant`'s batches, newest first, after the id `after`; whether more follow."""
        index = keys.tenant_batches(tenant)
        start = 0
        if after is not None:
            rank = self._redis.zrevrank(index, after)
            start = 0 if rank is None else int(rank) + 1  # type: ignore[arg-type]
        ids = [text_of(i) for i in self._redis.zrevrange(index, start, start + limit)]  # type: ignore[union-attr]
        pipe = self._redis.pipeline(transaction=False)
        for batch_id in ids[:limit]:
            pipe.hgetall(keys.batch(tenant, batch_id))
        found, gone = [], []
        for batch_id, raw in zip(ids[:limit], pipe.execute(), strict=True):
            (found.append(StoredBatch.from_hash(raw)) if raw else gone.append(batch_id))  # type: ignore[func-returns-value]
        if gone:
            self._redis.zrem(index, *gone)
        return found, len(ids) > limit

    def active(self) -> list[tuple[str, str]]:
        """Every batch a feeder works on: (tenant, batch id)."""
        return [parse_member(text_of(m)) for m in self._redis.zrange(keys.ACTIVE_BATCHES, 0, -1)]  # type: ignore[union-attr]

    def active_count(self, tenant: str) -> int:
        """`tenant`'s batches not ended yet."""
        prefix = keys.key_part(tenant)
        return int(
            self._redis.zlexcount(keys.ACTIVE_BATCHES, f"[{prefix}:", f"({prefix};")
        )  # ';' follows ':'

    def open_lines(self, tenant: str, batch_id: str) -> dict[int, str]:
        """The batch's claimed, unsettled lines: line -> `c:<claimed at>` or `j:<job id>`."""
        raw = self._redis.hgetall(keys.batch_open(tenant, batch_id))
        return {int(text_of(k)): text_of(v) for k, v in raw.items()}

    def claim(self, tenant: str, batch_id: str, count: int, now: float) -> range:
        """Claim up to `count` lines from the cursor, if the batch runs and is not stopping."""
        start, claimed = self._claim(
            keys=[keys.batch(tenant, batch_id), keys.batch_open(tenant, batch_id)], args=[count, now]
        )
        return range(int(start), int(start) + int(claimed)) if int(start) >= 0 else range(0)

    def reclaim(self, tenant: str, batch_id: str, line: int, was: str, now: float) -> bool:
        """Take over line `line` whose stale claim reads `was`."""
        return bool(
            self._reclaim(keys=[keys.batch_open(tenant, batch_id)], args=[line, was, CLAIMED + str(now)])
        )

    def released(
        self, pipe: Pipeline, tenant: str, batch_id: str, line: int, job_id: str, custom_id: str
    ) -> None:
        """In the transaction that creates the line's job: the line names it (and its custom_id,
        so its output is written even if the input file is gone by then)."""
        pipe.hset(keys.batch_open(tenant, batch_id), str(line), f"{RELEASED}{job_id}:{custom_id}")

    def settle(self, batch: StoredBatch, line: int, outcome: Settled, text: str, now: int) -> bool:
        """Write line `line`'s output (`completed`) or error (`failed`) line `text` and count it, if
        no one settled it first; whether this call did."""
        file_id = batch.output_file_id if outcome == "completed" else batch.error_file_id
        written = "outputs" if outcome == "completed" else "errors_written"
        keys_, file_args = self._file_args(batch, file_id, now)
        done = self._settle(keys=[keys.batch(batch.tenant, batch.id), keys.batch_open(batch.tenant, batch.id),
                                  *keys_], args=[line, outcome, written, *file_args, text])  # fmt: skip
        return bool(done)

    def forget(self, batch: StoredBatch, line: int) -> bool:
        """Drop open line `line` without writing it (a cancelled batch's line that never became a job)."""
        return bool(self._redis.hdel(keys.batch_open(batch.tenant, batch.id), str(line)))

    def unrun(self, batch: StoredBatch, cursor: int, texts: list[str], now: int) -> int:
        """Write the error lines `texts` of the unclaimed lines from `cursor`; how many (0: someone did)."""
        keys_, file_args = self._file_args(batch, batch.error_file_id, now)
        return int(
            self._unrun(keys=[keys.batch(batch.tenant, batch.id), *keys_], args=[cursor, *file_args, *texts])
        )

    def stop(self, tenant: str, batch_id: str, reason: str) -> bool:
        """Release no more lines of the running batch (`reason`); whether this call stopped it."""
        return bool(self._stop(keys=[keys.batch(tenant, batch_id)], args=[reason]))

    def advance(
        self,
        batch: StoredBatch,
        from_: tuple[str, ...],
        to: str,
        now: int,
        when: Literal["", "open", "all"] = "",
        ttl: int = 0,
        webhook: tuple[str, str] | None = None,
        **fields: Any,
    ) -> bool:
        """Move the batch from one of `from_` to `to` (stamping `<to>_at`, and `fields`); with `when`,
        only once no line is open (`all`: and every line is claimed). `ttl`: the batch ends and
        lives that long; `webhook`: its outbox entry (message id, value). Whether it moved."""
        stamp = f"{to}_at"
        message_id, value = webhook or ("", "")
        pairs = [str(x) for kv in fields.items() for x in kv]
        ended = to in BATCH_ENDED
        moved = self._advance(
            keys=[keys.batch(batch.tenant, batch.id), keys.batch_open(batch.tenant, batch.id),
                  keys.ACTIVE_BATCHES, keys.WEBHOOK_OUTBOX],
            args=[",".join(from_), to, stamp, now, when, ttl if ended else 0,
                  member(batch.tenant, batch.id), message_id, value, *pairs],
        )  # fmt: skip
        return bool(moved)

    def _file_args(self, batch: StoredBatch, file_id: str, now: int) -> tuple[list[str], list[Any]]:
        kind = "output" if file_id == batch.output_file_id else "error"
        file = StoredFile(id=file_id, tenant=batch.tenant, purpose="batch_output",
                          filename=f"{batch.id}_{kind}.jsonl", created_at=now,
                          expires_at=now + batch.output_ttl)  # fmt: skip
        file_keys = [keys.file_meta(batch.tenant, file_id), keys.file_lines(batch.tenant, file_id),
                     keys.tenant_files(batch.tenant)]  # fmt: skip
        return file_keys, [file.id, file.tenant, file.filename, file.created_at, file.expires_at]


def event_value(url: str, tenant: str, batch_id: str, kind: str, now: int) -> tuple[str, str]:
    """The outbox entry (message id, value) of the webhook telling that a batch ended (`kind`:
    completed, failed, expired or cancelled), in OpenAI's webhook event shape."""
    message_id = f"msg_{batch_id}_{kind}"
    body = {"id": f"evt_{batch_id}_{kind}", "object": "event", "type": f"batch.{kind}",
            "created_at": now, "data": {"id": batch_id}}  # fmt: skip
    return message_id, json.dumps({"url": url, "body": json.dumps(body), "tenant": tenant, "at": now})
