"""Entrypoint of the scheduler process."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import structlog
from prometheus_client import CollectorRegistry

from scheduler import routing
from scheduler.feeder import start_feeder
from scheduler.loop import Scheduler
from scheduler.reaper import Reaper
from scheduler.tokens import PromptCounter
from shared import keys
from shared.connection import connect
from shared.exposition import serve_metrics
from shared.heartbeat import Heartbeat, SchedulerBeat
from shared.jobstore.cleanup import Cleanup
from shared.logging import configure_logging
from shared.metrics import SchedulerMetrics, label_process
from shared.registry import model_spec
from shared.settings import Settings
from shared.tracing import configure_tracing


def scheduler_metrics(settings: Settings) -> SchedulerMetrics:
    """The scheduler's metrics, every decision it knows and its model's endings at 0 from the start."""
    metrics = SchedulerMetrics(CollectorRegistry())
    single, multi, own = keys.SINGLE_QUEUE, keys.MULTI_QUEUE, keys.OWN_QUEUES_LABEL
    routes = [(single, routing.REASON_WITHIN_THRESHOLD), (multi, routing.REASON_OVER_THRESHOLD),
              (single, routing.REASON_PRESSURE_SPILL), (multi, routing.REASON_PRESSURE_SPILL),
              *((own, reason) for reason in routing.AFFINITY_REASONS)]  # fmt: skip
    holds = (routing.HOLD_NO_LIVE_WORKER, routing.HOLD_MEMORY_CRITICAL, routing.HOLD_MEMORY_WARN)
    admissions = [("admitted", "fits_context"), *(("held", reason) for reason in holds),
                  ("rejected", routing.REJECT_HOLD_EXPIRED)]  # fmt: skip
    metrics.start_at_zero(settings.model, routes, admissions)
    label_process(metrics.registry, "scheduler", settings.telemetry_identity())
    return metrics


def main(settings: Settings | None = None) -> None:
    """Build settings, configure logging, tracing and metrics, schedule until SIGTERM or SIGINT."""
    settings = settings or Settings()
    configure_logging(settings, "scheduler")
    configure_tracing(settings, "scheduler")
    metrics = scheduler_metrics(settings) if settings.observability else None
    metrics_url = (
        serve_metrics(metrics.registry, settings.metrics_host, settings.scheduler_metrics_port)
        if metrics
        else None
    )
    log = structlog.get_logger()
    redis = connect(settings.redis_url_or_default(), blocking=True, acks=settings.redis_acks())
    counter = PromptCounter(settings.cache_dir, settings.vocab_dir())
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    counter.wait_for(model_spec(settings.model), stop=stop)
    scheduler = Scheduler(settings, redis, counter, metrics)
    name = f"{socket.gethostname()}.{os.getpid()}"
    beat = Heartbeat(
        redis,
        keys.scheduler_heartbeat(name),
        lambda: SchedulerBeat(
            name=name,
            pid=os.getpid(),
            host=socket.gethostname(),
            routed=scheduler.routed,
            at=time.time(),
            metrics_url=metrics_url,
        ),
        settings.heartbeat_interval,
        settings.heartbeat_ttl,
    )
    beat.start()
    feeder = start_feeder(settings, metrics.registry if metrics else None, scheduler.webhooks, stop)
    log.info(
        "scheduler_started",
        name=name,
        model=settings.model,
        threshold=settings.multi_gpu_threshold,
        metrics=metrics_url,
    )
    try:
        # Heartbeats are trusted once Redis has been up longer than one lives (plus a beat).
        reaper = Reaper(
            redis,
            settings.job_max_retries,
            settings.heartbeat_ttl + 1.0,
            metrics,
            cleanup=Cleanup(redis),
            webhooks=scheduler.webhooks,
        )
        scheduler.run(stop, on_tick=reaper.sweep_if_due)
    finally:
        beat.stop()
        feeder.join(timeout=5)
        log.info("scheduler_stopped", routed=scheduler.routed)
