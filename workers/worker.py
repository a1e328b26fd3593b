"""The no-fork RQ worker: the model stays loaded across jobs, and a thread keeps its heartbeat."""

from __future__ import annotations

import os
import socket
import time

import structlog
from redis import Redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue

from shared import keys
from shared.heartbeat import Heartbeat, WorkerBeat
from shared.queues import SERIALIZER, open_queue
from shared.settings import Settings


class GenerationWorker(SimpleWorker):
    """A SimpleWorker (jobs run in this process, next to the model) that reports busy or idle."""

    def __init__(self, queue: Queue, redis: Redis, name: str, model: str, device: str):
        super().__init__(
            [queue], connection=redis, name=name, serializer=SERIALIZER, log_job_description=False
        )
        self.model_name, self.device = model, device
        self.current_job_id: str | None = None
        self.jobs_done = 0
        # Not `state`: that is RQ's own property, written to the worker's Redis hash.
        self.activity = "loading"

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.current_job_id, self.activity = job.id, "busy"
        try:
            super().execute_job(job, queue)
        finally:
            self.current_job_id, self.activity = None, "idle"
            self.jobs_done += 1
            structlog.contextvars.clear_contextvars()

    def beat(self) -> WorkerBeat:
        """This worker's state as a heartbeat."""
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
        )


def worker_name(queue: str) -> str:
    """A name unique to this process: host, pid and queue."""
    return f"{socket.gethostname()}.{os.getpid()}.{queue}"


def build_worker(settings: Settings, redis: Redis, device: str) -> tuple[GenerationWorker, Heartbeat]:
    """The worker for `settings.worker_queue` and the heartbeat that reports it."""
    name = worker_name(settings.worker_queue)
    worker = GenerationWorker(open_queue(settings.worker_queue, redis), redis, name, settings.model, device)
    heartbeat = Heartbeat(
        redis, keys.worker_heartbeat(name), worker.beat, settings.heartbeat_interval, settings.heartbeat_ttl
    )
    return worker, heartbeat
