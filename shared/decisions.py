"""Recent admission and routing decisions, kept in a capped Redis list for the debug bundle."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from shared import keys

DECISIONS_KEPT = 500
"""How many recent decisions are kept."""


def record(redis: Redis, decision: dict[str, Any]) -> None:
    """Remember one decision (newest first), keeping the list capped and expiring."""
    pipe = redis.pipeline(transaction=False)
    pipe.lpush(keys.DECISIONS, json.dumps(decision))
    pipe.ltrim(keys.DECISIONS, 0, DECISIONS_KEPT - 1)
    pipe.expire(keys.DECISIONS, keys.DECISIONS_TTL)
    pipe.execute()


def recent(redis: Redis, count: int = DECISIONS_KEPT) -> list[dict[str, Any]]:
    """The latest `count` decisions, newest first."""
    return [json.loads(raw) for raw in redis.lrange(keys.DECISIONS, 0, count - 1)]
