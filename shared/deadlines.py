"""When a job must have started by: the client's `deadline` or `cancel_after`, whichever is sooner."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shared.stages import META_DEADLINE


def start_deadline(received: float, deadline: datetime | None, cancel_after: float | None) -> float | None:
    """Unix time by which a job received at `received` must start; None when it may wait forever."""
    limits = []
    if deadline is not None:
        limits.append(deadline.timestamp())
    if cancel_after is not None:
        limits.append(received + cancel_after)
    return min(limits) if limits else None


def past_deadline(meta: dict[str, Any], now: float) -> bool:
    """The job (by its meta) was due to start before `now`."""
    deadline = meta.get(META_DEADLINE)
    return deadline is not None and now > float(deadline)


def expiry_message(meta: dict[str, Any], now: float) -> str:
    """Why a job expired, for the client."""
    late = now - float(meta.get(META_DEADLINE, now))
    return f"The job was not started by its deadline (late by {late:.1f} s); it will not run."
