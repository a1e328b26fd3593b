"""Admission at the API: a bounded backlog, so a burst is refused with 429 before any job exists.

Check and enqueue happen under one short Redis lock, so concurrent submissions (threads, API
replicas) cannot all pass the check and overshoot the budget together.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from redis import Redis
from redis.exceptions import LockError

from shared import keys
from shared.drain import drain_rate, retry_after, tenant_waiting
from shared.errors import BacklogFull, ServiceUnavailable, TenantBacklogFull
from shared.jobstore.lifecycle import waiting_count
from shared.metrics import ApiMetrics
from shared.settings import Settings

log = structlog.get_logger()


def check_backlog(redis: Redis, settings: Settings, metrics: ApiMetrics, tenant: str) -> None:
    """Raise BacklogFull (429, with Retry-After from the measured drain rate) when the jobs waiting
    in all queues have reached the budget, or TenantBacklogFull when `tenant`'s own have."""
    mine = tenant_waiting(redis, tenant)
    if mine >= settings.tenant_backlog_budget:
        wait = retry_after(mine - settings.tenant_backlog_budget + 1, drain_rate(redis))
        metrics.admission_decisions.labels("refused", "tenant_backlog_full").inc()
        log.info("admission_decided", outcome="refused", reason="tenant_backlog_full", backlog=mine)
        raise TenantBacklogFull(
            f"You have {mine} jobs waiting, at your budget of {settings.tenant_backlog_budget}; "
            f"retry in {wait} s.",
            headers={"Retry-After": str(wait)},
        )
    waiting = waiting_count(redis)
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


ADMISSION_LOCK_TIMEOUT = 5.0
"""Seconds the admission lock lives if its holder dies mid-submission."""

ADMISSION_LOCK_WAIT = 2.0
"""Seconds a submission waits for the admission lock before answering 503."""


TURN_WAIT = 30.0
"""Seconds a submission waits for its process's turn at admission (the turns are served in order,
so this is a queue that moves, not contention)."""


@contextmanager
def admitted(
    redis: Redis, settings: Settings, metrics: ApiMetrics, tenant: str, turn: threading.Lock
) -> Iterator[None]:
    """Within the block the backlog has room for one more job: enqueue it there. The process's
    submissions take `turn` first, so one of them at a time polls the Redis lock that the API
    processes share: under gevent, hundreds of greenlets polling it would starve one another."""
    if not turn.acquire(timeout=TURN_WAIT):
        raise ServiceUnavailable("Admission is busy; retry shortly.", headers={"Retry-After": "1"})
    try:
        with redis.lock(
            keys.ADMISSION_LOCK, timeout=ADMISSION_LOCK_TIMEOUT, blocking_timeout=ADMISSION_LOCK_WAIT
        ):
            check_backlog(redis, settings, metrics, tenant)
            yield
    except LockError:
        raise ServiceUnavailable("Admission is busy; retry shortly.", headers={"Retry-After": "1"}) from None
    finally:
        turn.release()
