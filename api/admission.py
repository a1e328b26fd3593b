"""Admission at the API: a bounded backlog, so a burst is refused with 429 before any job exists."""

from __future__ import annotations

import structlog
from redis import Redis

from shared.drain import backlog, drain_rate, retry_after
from shared.errors import BacklogFull
from shared.metrics import ApiMetrics
from shared.settings import Settings

log = structlog.get_logger()


def check_backlog(redis: Redis, settings: Settings, metrics: ApiMetrics) -> None:
    """Raise BacklogFull (429, with Retry-After from the measured drain rate) when the jobs waiting
    in all queues have reached the budget."""
    waiting = backlog(redis)
    if waiting < settings.backlog_budget:
        return
    rate = drain_rate(redis)
    wait = retry_after(waiting - settings.backlog_budget + 1, rate)
    metrics.admission_decisions.labels("refused", "backlog_full").inc()
    log.info("admission_decided", outcome="refused", reason="backlog_full", backlog=waiting, drain_rate=rate)
    raise BacklogFull(
        f"{waiting} jobs are waiting, at the budget of {settings.backlog_budget}; retry in {wait} s.",
        headers={"Retry-After": str(wait)},
    )
