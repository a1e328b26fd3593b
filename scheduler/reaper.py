"""The reaper: finds jobs whose worker stopped heartbeating and hands them back to their queue.

RQ's no-fork worker sends no heartbeat of its own while a job runs, and RQ notices an abandoned
job only when its execution expires (minutes); our workers heartbeat from a thread every second,
so a worker killed mid-job is noticed within the heartbeat TTL plus one sweep. After a sweep it
also runs the jobstore's cleanup of RQ's registries and worker sets, when that is due.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from redis import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.affinity import own_queue_owners
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore import lifecycle
from shared.jobstore.cleanup import Cleanup
from shared.jobstore.ledger import running
from shared.metrics import SchedulerMetrics
from shared.webhooks import WebhookSender

log = structlog.get_logger()

SWEEP_INTERVAL = 1.0
"""Seconds between sweeps."""


class Reaper:
    """Compares the jobs workers say they run with the workers still alive."""

    def __init__(
        self,
        redis: Redis,
        max_retries: int,
        settle: float,
        metrics: SchedulerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cleanup: Cleanup | None = None,
        webhooks: WebhookSender | None = None,
    ):
        self._redis, self._max_retries, self._metrics = redis, max_retries, metrics
        self._cleanup = cleanup
        self._webhooks = webhooks
        self._clock, self._wall_clock = clock, wall_clock
        self._settle = settle
        self._last_seen: dict[str, float] = {}
        self._next_sweep = 0.0
        self._healthy_since: float | None = None

    def sweep_if_due(self) -> None:
        """Sweep when SWEEP_INTERVAL has passed since the last sweep, then clean up RQ's keys if
        that is due."""
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            try:
                self.sweep()
            except RedisError:
                self._healthy_since = None
                raise
            if self._cleanup is not None:
                self._cleanup.run_if_due()
            if self._webhooks is not None:
                self._webhooks.redeliver()  # messages whose sender died before delivering them

    def settled(self) -> bool:
        """Whether heartbeats can be trusted: Redis has answered us, and has been up, for longer
        than a heartbeat lives. Right after an outage every heartbeat has lapsed while its worker
        is alive; handing its job back then would run it twice."""
        now = self._clock()
        if self._healthy_since is None:
            self._healthy_since = now
        uptime = float(self._redis.info("server").get("uptime_in_seconds", 0))
        return now - self._healthy_since >= self._settle and uptime >= self._settle

    def sweep(self) -> dict[str, str]:
        """Hand back every job of a worker without a live heartbeat; {job id: outcome}."""
        if not self.settled():
            return {}
        beats = read_live(self._redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
        live = {b.name for b in beats}
        for beat in beats:
            self._last_seen[beat.name] = beat.at
        outcomes: dict[str, str] = {}
        for job_id, entry in running(self._redis).items():
            if entry.worker in live:
                continue
            last = self._last_seen.get(entry.worker, entry.started_at)
            reason = f"worker {entry.worker} stopped heartbeating"
            outcome = lifecycle.hand_back(self._redis, job_id, reason, self._max_retries)
            outcomes[job_id] = outcome
            if outcome == "gone":
                continue
            detected_after = self._wall_clock() - last
            if self._metrics is not None:
                self._metrics.jobs_requeued.labels(outcome).inc()
                self._metrics.worker_loss_detection.observe(detected_after)
            log.warning(
                "worker_lost",
                worker=entry.worker,
                job_id=job_id,
                outcome=outcome,
                detected_after_s=round(detected_after, 2),
            )
        for owner in own_queue_owners(self._redis) - live:
            # Session turns routed to a worker that died before taking them: routed afresh.
            for job_id in lifecycle.release_own_queue(self._redis, owner):
                outcomes[job_id] = "requeued"
        return outcomes
