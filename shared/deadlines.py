"""When a job must have started by: the client's `deadline` or `cancel_after`, whichever is sooner."""

from __future__ import annotations

from datetime import datetime


def start_deadline(received: float, deadline: datetime | None, cancel_after: float | None) -> float | None:
    """Unix time by which a job received at `received` must start; None when it may wait forever."""
    limits = []
    if deadline is not None:
        limits.append(deadline.timestamp())
    if cancel_after is not None:
        limits.append(received + cancel_after)
    return min(limits) if limits else None
