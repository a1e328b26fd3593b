"""The no-fork RQ worker: the model stays loaded across jobs, and a thread keeps its heartbeat."""

from __future__ import annotations

import logging
import os
import socket
import time

import structlog
from opentelemetry import context as otel_context
from redis import Redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue

from shared import keys
from shared.heartbeat import Heartbeat, WorkerBeat
from shared.metrics import WorkerMetrics
from shared.queues import SERIALIZER, open_queue
from shared.settings import Settings
from shared.stages import META_REQUEST_ID
from shared.tracing import context_from
from workers.memory import read_memory


class GenerationWorker(SimpleWorker):
    """A SimpleWorker (jobs run in this process, next to the model) that reports busy or idle."""

    def __init__(
        self,
        queue: Queue,
        redis: Redis,
        name: str,
        model: str,
        device: str,
        metrics: WorkerMetrics | None = None,
    ):
        super().__init__(
            [queue], connection=redis, name=name, serializer=SERIALIZER, log_job_description=False
        )
        self.model_name, self.device, self.metrics = model, device, metrics
        self.metrics_url: str | None = None
        self.current_job_id: str | None = None
        self.jobs_done = 0
        # Not `state`: that is RQ's own property, written to the worker's Redis hash.
        self.activity = "loading"

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.current_job_id, self.activity = job.id, "busy"
        # RQ's own lines about this job (success, failure, result TTL) carry its ids and trace too.
        structlog.contextvars.bind_contextvars(job_id=job.id, request_id=job.meta.get(META_REQUEST_ID))
        token = otel_context.attach(context_from(job.meta))
        try:
            super().execute_job(job, queue)
        finally:
            otel_context.detach(token)
            self.current_job_id, self.activity = None, "idle"
            self.jobs_done += 1
            structlog.contextvars.clear_contextvars()

    def beat(self) -> WorkerBeat:
        """This worker's state as a heartbeat (and its memory gauges brought up to date)."""
        memory = read_memory(self.device)
        if self.metrics is not None:
            self.metrics.memory_used.labels(memory.device).set(memory.used)
            self.metrics.memory_total.labels(memory.device).set(memory.total)
            self.metrics.memory_pressure.labels(memory.device).set(memory.pressure)
        running = 1 if self.activity == "busy" else 0
        if self.metrics is not None:
            self.metrics.requests_running.labels(self.model_name, self.queues[0].name).set(running)
        return WorkerBeat(
            name=self.name,
            queue=self.queues[0].name,
            model=self.model_name,
            device=self.device,
            state=self.activity,  # type: ignore[arg-type]
            current_job=self.current_job_id,
            jobs_done=self.jobs_done,
            pid=os.getpid(),
            host=socket.gethostname(),
            at=time.time(),
            metrics_url=self.metrics_url,
            memory_used_bytes=memory.used,
            memory_total_bytes=memory.total,
        )


def quiet_dequeue_lines(record: logging.LogRecord) -> bool:
    """Drop RQ's per-job dequeue line, logged before the job's ids can be bound: our `job_started`
    event says the same with request id, job id and trace id (a filter for the `rq.worker` logger,
    matched on rq 3.0's message format)."""
    return record.msg != "Worker %s: %s: %s"


def worker_name(queue: str) -> str:
    """A name unique to this process: host, pid and queue."""
    return f"{socket.gethostname()}.{os.getpid()}.{queue}"


def build_worker(
    settings: Settings, redis: Redis, device: str, metrics: WorkerMetrics | None = None
) -> tuple[GenerationWorker, Heartbeat]:
    """The worker for `settings.worker_queue` and the heartbeat that reports it."""
    name = worker_name(settings.worker_queue)
    queue = open_queue(settings.worker_queue, redis)
    worker = GenerationWorker(queue, redis, name, settings.model, device, metrics)
    heartbeat = Heartbeat(
        redis, keys.worker_heartbeat(name), worker.beat, settings.heartbeat_interval, settings.heartbeat_ttl
    )
    return worker, heartbeat
