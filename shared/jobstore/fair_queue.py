"""The order in which workers take jobs: weighted fair between tenants within each priority queue.

A worker takes from its queues in their order (its own queue, then priorities highest first); the
first queue holding a job it may take gives it. In a priority queue of a worker queue the job is
chosen by start-time fair queuing (SFQ, Goyal et al. 1996) among the first `WINDOW` entries: each
tenant has a virtual finish tag per worker queue (`keys.fair_tags`), the queue a virtual time
(`keys.fair_clock`, the start tag of the last job taken); a tenant's start tag is max(its finish
tag, the virtual time), the tenant with the smallest one is served (ties: the job nearer the
front), its oldest job is taken, and its finish tag becomes start + 1 / its weight. A tenant that
floods a queue thus waits behind every tenant it has been served ahead of, in proportion to the
weights, while its own jobs keep their order. A worker's own queue (session turns, requests
identical to a row it decodes) stays in arrival order.

The script reads each waiting job's tenant from `keys.queued_tenants`, which every enqueue onto a
worker's queue writes (rqstore.enqueue); a job put there another way (give_back, RQ's own tools)
has its tenant read from its record's JSON instead (about 7x the cost per entry). Everything, the
running ledger's entry included, happens in one script: no job is ever nowhere.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from redis import Redis

from shared import keys
from shared.jobstore import rqstore

WINDOW = 256
"""Entries at the front of a queue among which the fair take chooses: above a tenant's backlog
budget's default (200), and it bounds the script's work (measured on 2 busy cores with 256 queued:
a take about 1 ms of Redis time, reading the waiting tenants 0.7 ms; twice that from records)."""

_TENANTS_OF = """
local function tenants_of(ids, tenants_key)
  local known = redis.call('HMGET', tenants_key, unpack(ids))
  for i, id in ipairs(ids) do
    if not known[i] then
      local meta = redis.call('HGET', cfg.prefix .. id, 'meta')
      if meta then
        local ok, record = pcall(cjson.decode, meta)
        local tenant = ok and type(record) == 'table' and record.tenant
        known[i] = type(tenant) == 'string' and tenant or cfg.default
      elseif redis.call('EXISTS', cfg.prefix .. id) == 1 then
        known[i] = cfg.default
      end
    end
  end
  return known
end
"""

_TAKE = (
    "local cfg = cjson.decode(ARGV[1])\n"
    + _TENANTS_OF
    + """
local skip, skipping = {}, false
for _, t in ipairs(cfg.skip) do skip[t] = true; skipping = true end
local weights = cfg.weights
for q, spec in ipairs(cfg.queues) do
  local at = 1 + (q - 1) * 4
  local list, tenants, tags, clock = KEYS[at + 1], KEYS[at + 2], KEYS[at + 3], KEYS[at + 4]
  local id
  if not spec.fair and not skipping then
    id = redis.call('LPOP', list)
  else
    local ids = redis.call('LRANGE', list, 0, cfg.window - 1)
    if #ids > 0 then
      local owners = tenants_of(ids, tenants)
      local now = tonumber(redis.call('GET', clock) or '0')
      local seen, best_start, best_tenant = {}, nil, nil
      for i, candidate in ipairs(ids) do
        local t = owners[i]
        if not t then  -- deleted or expired while queued: nothing to run
          redis.call('LREM', list, 1, candidate)
          redis.call('HDEL', tenants, candidate)
        elseif not skip[t] and not seen[t] then
          seen[t] = true
          if not spec.fair then
            id = candidate
            break
          end
          local start = math.max(tonumber(redis.call('HGET', tags, t) or '0'), now)
          if best_start == nil or start < best_start then
            id, best_start, best_tenant = candidate, start, t
          end
          if start <= now then break end  -- no start tag is smaller: the earliest such job wins
        end
      end
      if id then
        redis.call('LREM', list, 1, id)
        if spec.fair then
          local weight = weights[best_tenant] or 1
          redis.call('HSET', tags, best_tenant, best_start + 1 / weight)
          redis.call('EXPIRE', tags, cfg.ttl)
          redis.call('SET', clock, best_start, 'EX', cfg.ttl)
        end
      end
    end
  end
  if id then
    redis.call('HDEL', tenants, id)
    if redis.call('LLEN', list) == 0 then redis.call('DEL', tenants) end
    redis.call('HSET', KEYS[1], id, spec.entry)
    return {id, q - 1}
  end
end
return false
"""
)

_WAITING = (
    "local cfg = cjson.decode(ARGV[1])\n"
    + _TENANTS_OF
    + """
local found, out = {}, {}
for q = 1, #KEYS, 2 do
  local ids = redis.call('LRANGE', KEYS[q], 0, cfg.window - 1)
  if #ids > 0 then
    for _, t in ipairs(tenants_of(ids, KEYS[q + 1])) do
      if t and not found[t] then found[t] = true; out[#out + 1] = t end
    end
  end
end
return out
"""
)


def _config(**fields: Any) -> str:
    return json.dumps(
        {"prefix": rqstore.job_key(""), "window": WINDOW, "default": keys.DEFAULT_TENANT, **fields}
    )


def pick(
    redis: Redis,
    queues: list[str],
    entries: list[str],
    weights: Mapping[str, float],
    skip_tenants: Collection[str] = (),
) -> tuple[str, int] | None:
    """Take the next job of `queues` (in their order, fairly within each priority queue by `weights`,
    tenant -> weight, 1 when unnamed; none of a tenant in `skip_tenants`): it leaves its queue and
    enters the running ledger under `entries[i]` for queue i in one step. Its id and i, or None when
    no queue holds one to take."""
    names: list[str] = [keys.RUNNING]
    specs = []
    for queue, entry in zip(queues, entries, strict=True):
        base = keys.fair_base(queue)
        names += [rqstore.queue_key(queue), keys.queued_tenants(queue),
                  keys.fair_tags(base or queue), keys.fair_clock(base or queue)]  # fmt: skip
        specs.append({"entry": entry, "fair": base is not None})
    # A Lua table decoded from an empty JSON object or array is the same empty table.
    config = {"queues": specs, "skip": sorted(skip_tenants), "ttl": keys.FAIR_TTL,
              "weights": {tenant: float(w) for tenant, w in weights.items()}}  # fmt: skip
    taken = redis.register_script(_TAKE)(names, [_config(**config)])  # EVALSHA: the body is not sent
    if not taken:
        return None
    raw, index = taken[0], int(taken[1])
    return (raw.decode() if isinstance(raw, bytes) else str(raw)), index


def waiting_tenants(redis: Redis, queues: list[str]) -> set[str]:
    """The tenants with a job among the first WINDOW of any of `queues` (empty: nothing waits)."""
    names = [name for queue in queues for name in (rqstore.queue_key(queue), keys.queued_tenants(queue))]
    found = redis.register_script(_WAITING)(names, [_config()])
    return {t.decode() if isinstance(t, bytes) else str(t) for t in found or ()}
