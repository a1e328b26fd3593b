"""Redis connections, built from the settings' URL and passed down to whoever needs one."""

from __future__ import annotations

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, *, blocking: bool = False) -> Redis:
    """A Redis client for `url`; `blocking` clients wait on BLMOVE/BLPOP, so reads never time out.

    redis-py 8 defaults socket_timeout to 5 s, which would cut RQ's and the scheduler's long
    blocking reads; short calls keep a timeout so a dead server is noticed.
    """
    return Redis.from_url(
        url,
        socket_timeout=None if blocking else 5.0,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=3),
    )
