"""What a worker reports in its heartbeat: the jobs it runs now, what it is doing, how much it has done,
and its memory and caches."""

from __future__ import annotations

import os
import socket
import time
from typing import Literal, Protocol

from shared.heartbeat import WorkerBeat
from shared.metrics import WorkerMetrics
from shared.settings import Settings
from workers.guard import MemoryGuard

Activity = Literal["loading", "idle", "busy"]


class HoldsKv(Protocol):
    """A worker's running session, as its heartbeat sees it (workers/session.BatchSession)."""

    @property
    def kv_bytes(self) -> int: ...


class WorkerState:
    """One worker's bookkeeping, read by its heartbeat thread: jobs begin and end here."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        device: str,
        guard: MemoryGuard,
        metrics: WorkerMetrics | None = None,
    ):
        self.name, self.settings, self.device = name, settings, device
        self.guard, self.metrics = guard, metrics
        self.running: dict[str, str] = {}
        """Every job running now: its id and its queue."""
        # Not `state`: that is RQ's own property of the worker, written to its Redis hash.
        self.activity: Activity = "loading"
        self.jobs_done = 0
        self.tokens_per_second: float | None = None
        self.metrics_url: str | None = None
        self.session: HoldsKv | None = None
        self.batch_size = settings.batch_size()

    def began(self, job_id: str, queue: str) -> None:
        """A job taken from `queue` starts."""
        self.running[job_id], self.activity = queue, "busy"

    def ended(self, job_id: str, seconds: float, completion_tokens: int | None = None) -> None:
        """A job ended (finished or failed) after `seconds`, having generated `completion_tokens`."""
        if completion_tokens is not None and seconds > 0:
            self.tokens_per_second = completion_tokens / seconds
        self.running.pop(job_id, None)
        self.jobs_done += 1
        if not self.running:
            self.activity = "idle"

    def clear(self) -> None:
        """Every running job was handed back."""
        self.running.clear()
        self.activity = "idle"

    def beat(self) -> WorkerBeat:
        """This worker's state as a heartbeat (and its memory gauges brought up to date)."""
        memory = self.guard.memory()
        running_jobs = list(self.running)
        running = len(running_jobs)
        session, sessions, kv = self.session, self.guard.sessions, self.guard.kv
        model = self.settings.model
        if sessions is not None:
            sessions.expire()
        if self.metrics is not None:
            self.metrics.session_cache_bytes.labels(model).set(sessions.nbytes if sessions else 0)
            self.metrics.memory_used.labels(memory.device).set(memory.used)
            self.metrics.memory_total.labels(memory.device).set(memory.total)
            self.metrics.memory_pressure.labels(memory.device).set(memory.pressure)
            self.metrics.requests_running.labels(model, self.settings.worker_queue).set(running)
        return WorkerBeat(
            name=self.name,
            queue=self.settings.worker_queue,
            model=model,
            device=self.device,
            state=self.activity,
            current_job=running_jobs[0] if running_jobs else None,
            jobs_done=self.jobs_done,
            pid=os.getpid(),
            host=socket.gethostname(),
            at=time.time(),
            metrics_url=self.metrics_url,
            memory_used_bytes=memory.used,
            memory_total_bytes=memory.total,
            pressure=memory.pressure,
            running=running,
            free_slots=max(0, self.batch_size - running),
            tokens_per_second=self.tokens_per_second,
            running_jobs=running_jobs,
            kv_cache_bytes=session.kv_bytes if session is not None else 0,
            kv_cache_budget_bytes=kv.budget if kv is not None else None,
        )
