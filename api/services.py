"""What the blueprints share, attached to the app once by `create_app`."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from redis import Redis

from api.ratelimit import TenantLimits
from shared.metrics import ApiMetrics
from shared.settings import Settings


@dataclass(frozen=True)
class Services:
    """The settings, the Redis connection, the metrics and the rate limits of one app."""

    settings: Settings
    redis: Redis
    metrics: ApiMetrics
    limits: TenantLimits


def services() -> Services:
    """The current app's services."""
    return current_app.extensions["gptoss"]
