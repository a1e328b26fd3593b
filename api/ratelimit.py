"""Per-tenant rate limits (requests and tokens per minute) with the `limits` library over Redis."""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis import Redis

from shared import keys
from shared.errors import RateLimited
from shared.settings import Settings


class TenantLimits:
    """Moving one-minute windows of requests and of tokens, per tenant, shared by all API replicas."""

    def __init__(self, settings: Settings, redis: Redis):
        # On the API's own connections, so its commands count against each request's Redis budget.
        storage = RedisStorage(
            settings.redis_url_or_default(),
            connection_pool=redis.connection_pool,
            key_prefix=keys.RATE_LIMIT_PREFIX,
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._requests = RateLimitItemPerMinute(settings.rate_limit_requests)
        self._tokens = RateLimitItemPerMinute(settings.rate_limit_tokens)

    def charge(self, tenant: str, tokens: int) -> None:
        """Count one request of `tokens` tokens for `tenant`, or raise RateLimited (429, Retry-After)."""
        tenant = keys.rate_limit_identity(tenant)  # the windows' keys: never another tenant's
        if not self._limiter.hit(self._requests, tenant, "requests"):
            self._refuse(self._requests, tenant, "requests", "requests")
        if not self._limiter.hit(self._tokens, tenant, "tokens", cost=max(1, tokens)):
            self._refuse(self._tokens, tenant, "tokens", "tokens")

    def _refuse(self, item: RateLimitItemPerMinute, tenant: str, kind: str, unit: str) -> None:
        stats = self._limiter.get_window_stats(item, tenant, kind)
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(
            f"Over the limit of {item.amount} {unit} per minute for your tenant; retry in {wait} s.",
            headers={"Retry-After": str(wait)},
        )
