"""Entrypoint of the worker process."""

from __future__ import annotations

import structlog
import torch

from shared.connection import connect
from shared.logging import configure_logging
from shared.registry import model_spec
from shared.settings import Settings
from workers import context
from workers.runtime import ModelRuntime, pick_device
from workers.worker import build_worker


def main(settings: Settings | None = None, burst: bool = False) -> None:
    """Build settings, configure logging, load the model once, then work the queue."""
    settings = settings or Settings()
    configure_logging(settings, "worker")
    log = structlog.get_logger()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    redis = connect(settings.redis_url_or_default(), blocking=True)
    worker, heartbeat = build_worker(settings, redis, pick_device(settings.device))
    heartbeat.start()  # "loading" while the model loads, so operators see it coming
    try:
        runtime = ModelRuntime.load(model_spec(settings.model), settings)
        context.bind(runtime, worker.name, settings.worker_queue)
        worker.activity = "idle"
        heartbeat.beat()
        log.info("worker_started", name=worker.name, queue=settings.worker_queue, model=settings.model)
        worker.work(burst=burst, logging_level=None)
    finally:
        heartbeat.stop()
        log.info("worker_stopped", name=worker.name, jobs_done=worker.jobs_done)
