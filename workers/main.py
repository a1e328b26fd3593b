"""Entrypoint of the worker process."""

from __future__ import annotations

import logging
import signal
import threading
import time

import structlog
import torch
from prometheus_client import CollectorRegistry
from redis import Redis
from redis.exceptions import RedisError
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from shared.connection import connect
from shared.exposition import serve_metrics
from shared.jobstore import lifecycle
from shared.logging import configure_logging
from shared.metrics import WorkerMetrics
from shared.registry import model_spec
from shared.settings import Settings
from shared.tracing import configure_tracing
from shared.webhooks import WebhookSender
from workers import context
from workers.runtime import ModelRuntime
from workers.tensor_parallel import placement_for
from workers.worker import GenerationWorker, build_worker, quiet_dequeue_lines

REDIS_WAIT = wait_exponential(multiplier=0.5, max=5)
"""Backoff between attempts to reach Redis again after the work loop lost it."""


def work_until_stopped(worker: GenerationWorker, redis: Redis, burst: bool) -> None:
    """Run RQ's work loop; when it ends without a stop request (RQ quits on an unexpected error,
    such as Redis going away), wait for Redis with backoff and start the loop again."""
    log = structlog.get_logger()
    stop = threading.Event()
    while True:
        worker.work(burst=burst, logging_level=None)
        if burst or worker.stop_asked or worker.stopping:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        log.warning("worker_loop_lost", reason="the work loop ended without a stop request")
        for attempt in Retrying(wait=REDIS_WAIT, retry=retry_if_exception_type(RedisError), reraise=True):
            with attempt:
                if stop.is_set():
                    return
                redis.ping()
                # The loop's teardown could not record its end while Redis was away; do it now so
                # the same name can register again.
                worker.register_death()
                # Jobs cut off mid-run go back to their queue (not counted as their failure).
                worker.hand_back_running("its worker lost Redis mid-job")
                lifecycle.rescue_dequeued(redis, worker.queues)
        log.info("worker_loop_restarting")


def release_sessions(redis: Redis, name: str) -> None:
    """As the worker stops: turns already routed to it are routed afresh (its caches die with it)."""
    try:
        lifecycle.release_own_queue(redis, name)
    except RedisError as exc:  # the scheduler's reaper releases them once our heartbeat lapses
        structlog.get_logger().warning("own_queue_not_released", error=str(exc))


def main(settings: Settings | None = None, burst: bool = False) -> None:
    """Build settings, configure logging, tracing and metrics, load the model once, work the queue."""
    settings = settings or Settings()
    configure_logging(settings, "worker")
    configure_tracing(settings, "worker")
    logging.getLogger("rq.worker").addFilter(quiet_dequeue_lines)
    log = structlog.get_logger()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    placement = placement_for(settings)
    if placement.rank != 0:
        # A tensor-parallel rank other than 0 takes no jobs: it runs what rank 0 hands it.
        follower = ModelRuntime.load(model_spec(settings.model), settings, placement)
        follower.relay.follow(follower)
        return
    metrics = WorkerMetrics(CollectorRegistry()) if settings.observability else None
    redis = connect(settings.redis_url_or_default(), blocking=True)
    worker, heartbeat = build_worker(settings, redis, placement.device, metrics)
    if metrics is not None:
        worker.report.metrics_url = serve_metrics(
            metrics.registry, settings.metrics_host, settings.worker_metrics_port
        )
    worker.on_exit = heartbeat.stop
    heartbeat.start()  # "loading" while the model loads, so operators see it coming
    runtime = None
    try:
        loading = time.perf_counter()
        runtime = ModelRuntime.load(model_spec(settings.model), settings, placement)
        if metrics is not None:
            metrics.model_load.labels(settings.model).set(time.perf_counter() - loading)
        webhooks = WebhookSender(settings)
        context.bind(runtime, worker.name, settings.worker_queue, metrics, settings.log_content, webhooks)
        worker.activity = "idle"
        heartbeat.beat()
        log.info(
            "worker_started",
            name=worker.name,
            queue=settings.worker_queue,
            model=settings.model,
            metrics=worker.report.metrics_url,
        )
        work_until_stopped(worker, redis, burst)
    finally:
        if runtime is not None and runtime.relay is not None:
            runtime.relay.release()  # the other tensor-parallel ranks stop too
        heartbeat.stop()
        release_sessions(redis, worker.name)
        log.info("worker_stopped", name=worker.name, jobs_done=worker.report.jobs_done)
