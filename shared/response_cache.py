"""The response cache: finished results of deterministic requests in Redis, by fingerprint, each
living `ttl` seconds after its last use, all of them within `max_bytes` (least recently used first
out). The bookkeeping (a last-use sorted set, a sizes hash, a byte counter) changes only inside Lua
scripts, so concurrent API and worker processes never see it half done."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis

from shared import keys
from shared.harmony import FINAL_CHANNEL, REASONING_CHANNEL
from shared.tools import call_channel

log = structlog.get_logger()

# KEYS: lru, sizes, bytes. ARGV: entry key prefix, then per script below. Entry keys are built from
# the prefix inside the scripts (eviction picks them there), so this needs one Redis, not a cluster.
_FORGET = """
local function renew(ttl)
  -- Bookkeeping outlives every entry (each lives `ttl` after its last use), and goes with an idle cache.
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
end
local function forget(fp)
  local size = redis.call('HGET', KEYS[2], fp)
  if size then redis.call('DECRBY', KEYS[3], size) end
  redis.call('HDEL', KEYS[2], fp)
  redis.call('ZREM', KEYS[1], fp)
  redis.call('DEL', ARGV[1] .. fp)
end
"""

# ARGV: prefix, fingerprint, now, ttl. The entry, its TTL and its last use renewed; nil if gone.
LOOKUP = (
    _FORGET
    + """
local value = redis.call('GET', ARGV[1] .. ARGV[2])
if not value then forget(ARGV[2]) return false end
redis.call('EXPIRE', ARGV[1] .. ARGV[2], ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
renew(ARGV[4])
return value
"""
)

# ARGV: prefix, fingerprint, now, ttl, max bytes, value. Returns the entries evicted, -1 when the
# value alone is over the budget, -2 when the fingerprint is cached already (the first answer stays).
STORE = (
    _FORGET
    + """
if redis.call('EXPIRE', ARGV[1] .. ARGV[2], ARGV[4]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  renew(ARGV[4])
  return -2
end
local size = string.len(ARGV[6])
forget(ARGV[2])  -- bookkeeping an expired entry left
for _, fp in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3] - ARGV[4])) do
  forget(fp)  -- unused for a whole TTL: its key has expired already, drop what still names it
end
if size > tonumber(ARGV[5]) then return -1 end
local evicted = 0
while tonumber(redis.call('GET', KEYS[3]) or '0') + size > tonumber(ARGV[5]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then break end
  forget(oldest[1])
  evicted = evicted + 1
end
redis.call('SET', ARGV[1] .. ARGV[2], ARGV[6], 'EX', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], size)
redis.call('INCRBY', KEYS[3], size)
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
renew(ARGV[4])
return evicted
"""
)


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds now."""

    bytes: int
    entries: int


class ResponseCache:
    """Cached job results (JSON of a JobResult) by request fingerprint."""

    def __init__(self, redis: Redis, ttl: int, max_bytes: int, clock: Callable[[], float] = time.time):
        self._redis, self.ttl, self.max_bytes, self._clock = redis, ttl, max_bytes, clock
        self._keys = [keys.RESPONSE_CACHE_LRU, keys.RESPONSE_CACHE_SIZES, keys.RESPONSE_CACHE_BYTES]
        self._prefix = keys.response_cache_entry("")
        self._lookup = redis.register_script(LOOKUP)
        self._store = redis.register_script(STORE)

    def lookup(self, fingerprint: str) -> dict[str, Any] | None:
        """The cached result of `fingerprint`, its TTL and recency renewed; None on a miss."""
        raw = self._lookup(keys=self._keys, args=[self._prefix, fingerprint, self._clock(), self.ttl])
        return json.loads(raw) if raw else None

    def store(self, fingerprint: str, result: dict[str, Any]) -> int:
        """Cache `result`, evicting the least recently used entries over the byte budget; the number
        evicted, or -1 when the result alone is over the budget, or -2 when the fingerprint is cached
        already: the first answer stays, so every hit gets the same bytes (two identical requests
        generated at once in different batches may differ in their last float bits, and so tokens)."""
        value = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
        args: list[str | int | float] = [
            self._prefix,
            fingerprint,
            self._clock(),
            self.ttl,
            self.max_bytes,
            value,
        ]
        return int(self._store(keys=self._keys, args=args))


def read_stats(redis: Redis) -> CacheStats:
    """Bytes and entries the cache holds (entries expired since the last store may still count)."""
    pipe = redis.pipeline(transaction=False)
    pipe.get(keys.RESPONSE_CACHE_BYTES)
    pipe.zcard(keys.RESPONSE_CACHE_LRU)
    size, entries = pipe.execute()
    return CacheStats(int(size or 0), int(entries))


def store_target(fingerprint: str, ttl: int, max_bytes: int) -> dict[str, Any]:
    """What the API puts in a missed job's record (`cache_key`): where its result goes, and the
    limits to keep (the API's settings govern the cache, so every writer keeps the same ones)."""
    return {"fingerprint": fingerprint, "ttl": ttl, "max_bytes": max_bytes}


def store_finished(redis: Redis, target: Any, result: dict[str, Any]) -> None:
    """Cache a finished job's `result` (served later with `cache: "hit"`) at `target` (a
    `store_target`, or None: not cacheable). A failure is logged, never raised: the job stands."""
    if not isinstance(target, dict):
        return
    try:
        cache = ResponseCache(redis, int(target["ttl"]), int(target["max_bytes"]))
        evicted = cache.store(str(target["fingerprint"]), {**result, "cache": "hit"})
    except Exception as exc:
        log.warning("cache_store_failed", error=f"{type(exc).__name__}: {exc}")
        return
    log.info("cache_stored", fingerprint=str(target["fingerprint"])[:16], stored=evicted >= 0,
             evicted=max(evicted, 0))  # fmt: skip


def channel_texts(result: dict[str, Any]) -> list[tuple[str, str]]:
    """A finished result's non-empty texts by channel, in stream order (reasoning, answer, then each
    tool call's arguments on its own channel): the token events that stand for it when it is served
    from the cache."""
    pairs = [(REASONING_CHANNEL, result.get("reasoning")), (FINAL_CHANNEL, result.get("text"))]
    for index, call in enumerate(result.get("tool_calls") or []):
        function = call["function"]
        pairs.append((call_channel(index, call["id"], function["name"]), function["arguments"]))
    return [(channel, text) for channel, text in pairs if text]
