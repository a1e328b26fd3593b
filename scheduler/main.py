"""Entrypoint of the scheduler process."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import structlog

from scheduler.loop import Scheduler
from scheduler.tokens import PromptCounter
from shared import keys
from shared.connection import connect
from shared.heartbeat import Heartbeat, SchedulerBeat
from shared.logging import configure_logging
from shared.registry import model_spec
from shared.settings import Settings


def main(settings: Settings | None = None) -> None:
    """Build settings, configure logging, schedule until SIGTERM or SIGINT."""
    settings = settings or Settings()
    configure_logging(settings, "scheduler")
    log = structlog.get_logger()
    redis = connect(settings.redis_url_or_default(), blocking=True)
    counter = PromptCounter(settings.cache_dir)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    counter.wait_for(model_spec(settings.model))
    scheduler = Scheduler(settings, redis, counter)
    name = f"{socket.gethostname()}.{os.getpid()}"
    beat = Heartbeat(
        redis,
        keys.scheduler_heartbeat(name),
        lambda: SchedulerBeat(
            name=name, pid=os.getpid(), host=socket.gethostname(), routed=scheduler.routed, at=time.time()
        ),
        settings.heartbeat_interval,
        settings.heartbeat_ttl,
    )
    beat.start()
    log.info("scheduler_started", name=name, model=settings.model, threshold=settings.multi_gpu_threshold)
    try:
        scheduler.run(stop)
    finally:
        beat.stop()
        log.info("scheduler_stopped", routed=scheduler.routed)
