"""What the blueprints share, attached to the app once by `create_app`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import current_app
from redis import Redis

from api.active import ActiveRequests
from api.ratelimit import TenantLimits
from api.streams import StreamSlots
from shared.jobstore.hub import StreamHub
from shared.metrics import ApiMetrics
from shared.settings import Settings


@dataclass(frozen=True)
class Services:
    """The settings, the Redis connections, the metrics and the rate limits of one app."""

    settings: Settings
    redis: Redis
    """Within each request's Redis budget (`shared.connection.open_budget`): a stalled Redis answers
    503 instead of holding the request."""
    metrics: ApiMetrics
    limits: TenantLimits
    stream_redis: Redis
    """Outside any budget: for reading what a streamed or synchronous answer waits on, for as long
    as the job runs."""
    hub: StreamHub
    """The process's one reader of job event streams (over `stream_redis`)."""
    streams: StreamSlots
    active: ActiveRequests
    """The requests at work at once in this process, bounded."""
    admission_turn: threading.Lock = field(default_factory=threading.Lock)
    """This process's submissions take it in turn before the shared admission lock."""
    """Each tenant's open streams in this process, capped."""


def services() -> Services:
    """The current app's services."""
    return current_app.extensions["gptoss"]
