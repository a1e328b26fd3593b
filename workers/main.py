"""Entrypoint of the worker process."""

from __future__ import annotations

import logging
import signal
import time

import structlog
import torch
from redis import Redis
from redis.exceptions import RedisError

from shared.connection import connect
from shared.exposition import serve_metrics
from shared.jobstore import lifecycle
from shared.logging import configure_logging
from shared.metrics import worker_metrics
from shared.registry import model_spec
from shared.settings import Settings
from shared.tracing import configure_tracing
from shared.webhooks import WebhookSender
from workers import context
from workers.runtime import ModelRuntime
from workers.tensor_parallel import placement_for
from workers.worker import GenerationWorker, build_worker, quiet_dequeue_lines

RESTART_BACKOFF = (0.5, 5.0)
"""Seconds before the work loop starts again after it ended twice in a row within STEADY_LOOP, doubling
from the first to the second at most (a loop that keeps failing at once must not spin)."""

STEADY_LOOP = 30.0
"""Seconds a work loop must have run for its end to count as a first failure again."""


def work_until_stopped(worker: GenerationWorker, burst: bool) -> None:
    """Run RQ's work loop until a stop is requested. The worker rides out a Redis outage inside the
    loop; when the loop ends anyway (RQ quits on an unexpected error) or raises (its start or end
    met a dead Redis), the worker takes the outage path (`ride_out_outage`) and the loop starts
    again: the process never exits for it."""
    log = structlog.get_logger()
    quick_ends = 0
    while True:
        began = time.monotonic()
        try:
            worker.work(burst=burst, logging_level=None)
        except Exception as exc:  # RQ's start (register_birth, subscribe) or end met a dead Redis
            log.warning("worker_loop_failed", error=str(exc) or type(exc).__name__, exc_info=True)
            lost: BaseException = exc
        else:
            lost = RuntimeError("the work loop ended without a stop request")
        if burst or worker.stopping:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):  # RQ's own handlers need its loop running
            signal.signal(signum, lambda *_: worker.ask_stop())
        log.warning("worker_loop_lost", reason=str(lost))
        try:
            if not worker.ride_out_outage(lost, loop_ended=True):
                return
        except Exception:  # not Redis: logged; the loop starts again all the same
            log.exception("worker_loop_recovery_failed")
        quick_ends = quick_ends + 1 if time.monotonic() - began < STEADY_LOOP else 0
        if quick_ends > 1:
            low, high = RESTART_BACKOFF
            time.sleep(min(high, low * 2 ** (quick_ends - 2)))
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
    metrics = (
        worker_metrics(settings.model, settings.worker_queue, settings.telemetry_identity())
        if settings.observability
        else None
    )
    redis = connect(settings.redis_url_or_default(), blocking=True, acks=settings.redis_acks())
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
        webhooks = WebhookSender(settings, redis)
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
        work_until_stopped(worker, burst)
    finally:
        if runtime is not None and runtime.relay is not None:
            runtime.relay.release()  # the other tensor-parallel ranks stop too
        heartbeat.stop()
        release_sessions(redis, worker.name)
        log.info("worker_stopped", name=worker.name, jobs_done=worker.report.jobs_done)
