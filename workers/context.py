"""The runtime of this worker process, bound once at start.

RQ calls job functions by dotted name with only the job's arguments, so the model that the worker
loaded before taking jobs is reached here, the way Flask's `current_app` is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.runtime import ModelRuntime

_runtime: ModelRuntime | None = None
_worker: tuple[str, str] | None = None


def bind(runtime: ModelRuntime, worker_name: str, queue: str) -> None:
    """Make `runtime` the one job functions use in this process."""
    global _runtime, _worker
    _runtime, _worker = runtime, (worker_name, queue)


def current_runtime() -> ModelRuntime:
    """The runtime bound by the worker (RuntimeError outside a worker)."""
    if _runtime is None:
        raise RuntimeError("no model runtime is bound: job functions run inside `gptoss worker`")
    return _runtime


def current_worker() -> tuple[str, str]:
    """(worker name, queue) of this process."""
    if _worker is None:
        raise RuntimeError("no worker is bound")
    return _worker
