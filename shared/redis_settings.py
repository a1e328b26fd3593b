"""The settings that say where Redis is and how its writes must be kept: a part of `Settings`
(shared/settings.py), read from the same `GPTOSS_*` variables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from shared import sentinel
from shared.replication import Acks

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
"""Redis that a lone process (api, scheduler, worker) talks to when none is configured."""


class RedisSettings(BaseModel):
    """Where Redis is (a URL, or Sentinels and the primary's name) and which writes wait for replicas."""

    redis_url: str | None = Field(
        default=None,
        description="Redis URL with any credentials (redis://:password@host:port/0, redis://user:password@…"
        " for an ACL user, rediss:// for TLS); unset: `gptoss up` starts its own, locked with a password,"
        " others use localhost",
    )
    redis_sentinels: str | None = Field(
        default=None,
        description="Sentinels of a highly available Redis, host:port,host:port (instead of"
        " GPTOSS_REDIS_URL; redis+sentinel:// in GPTOSS_REDIS_URL says the same)",
    )
    redis_sentinel_master: str = Field(default="gptoss", description="Name the Sentinels know the primary by")
    redis_password: SecretStr | None = Field(
        default=None, description="Password of the Redis primary that GPTOSS_REDIS_SENTINELS watch"
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="Password of the Sentinels themselves (their requirepass)"
    )
    redis_wait_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas that must acknowledge an accepted job, a run's start and a job's end"
        " (WAIT) before they count; 0: none (a failover may lose the last second of them)",
    )
    redis_wait_timeout_ms: int = Field(
        default=1000, ge=1, description="Milliseconds to wait for those acknowledgements (then 503)"
    )
    redis_appendfsync: Literal["everysec", "always"] = Field(
        default="everysec",
        description="fsync policy of the AOF of `gptoss up`'s own Redis (always: no accepted job lost)",
    )

    def redis_url_or_default(self) -> str:
        """The configured Redis URL (redis+sentinel:// when Sentinels are named), or the local default."""
        if self.redis_sentinels:
            primary, watchers = self.redis_password, self.redis_sentinel_password
            return sentinel.compose(
                self.redis_sentinels,
                self.redis_sentinel_master,
                primary.get_secret_value() if primary else None,
                watchers.get_secret_value() if watchers else None,
            )
        return self.redis_url or DEFAULT_REDIS_URL

    def redis_given(self) -> bool:
        """A Redis is configured (a URL or Sentinels): `gptoss up` starts none of its own."""
        return bool(self.redis_url or self.redis_sentinels)

    def redis_acks(self) -> Acks:
        """The replica acknowledgements the job store's writes wait for."""
        return Acks(self.redis_wait_replicas, self.redis_wait_timeout_ms)
