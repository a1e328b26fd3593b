"""What this worker process bound once at start: its model runtime, name, queue and metrics.

RQ calls job functions by dotted name with only the job's arguments, so the model that the worker
loaded before taking jobs is reached here, the way Flask's `current_app` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.metrics import WorkerMetrics
    from shared.webhooks import WebhookSender
    from workers.runtime import ModelRuntime


@dataclass(frozen=True)
class WorkerContext:
    """The process-wide collaborators of job functions."""

    runtime: ModelRuntime
    worker_name: str
    queue: str
    metrics: WorkerMetrics | None = None
    log_content: bool = False
    webhooks: WebhookSender | None = None


_bound: WorkerContext | None = None


def bind(
    runtime: ModelRuntime,
    worker_name: str,
    queue: str,
    metrics: WorkerMetrics | None = None,
    log_content: bool = False,
    webhooks: WebhookSender | None = None,
) -> None:
    """Make these the collaborators job functions use in this process."""
    global _bound
    _bound = WorkerContext(runtime, worker_name, queue, metrics, log_content, webhooks)


def current() -> WorkerContext:
    """The bound context (RuntimeError outside a worker)."""
    if _bound is None:
        raise RuntimeError("no model runtime is bound: job functions run inside `gptoss worker`")
    return _bound


def current_runtime() -> ModelRuntime:
    """The runtime bound by the worker."""
    return current().runtime


def current_worker() -> tuple[str, str]:
    """(worker name, queue) of this process."""
    bound = current()
    return bound.worker_name, bound.queue
