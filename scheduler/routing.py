"""Admission and routing decisions: pure functions over plain data (prompt size, worker states,
settings), so every branch is a unit test and the loop around them only does I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from shared import keys

REASON_WITHIN_THRESHOLD = "within_threshold"
REASON_OVER_THRESHOLD = "over_threshold"
REASON_PRESSURE_SPILL = "pressure_spill"
REASON_SESSION_AFFINITY = "session_affinity"
REASON_IDENTICAL_DECODING = "identical_decoding"
AFFINITY_REASONS = (REASON_SESSION_AFFINITY, REASON_IDENTICAL_DECODING)
"""Reasons that route a job to one worker's own queue."""
HOLD_NO_LIVE_WORKER = "no_live_worker"
HOLD_MEMORY_CRITICAL = "memory_critical"
HOLD_MEMORY_WARN = "memory_warn_long_prompt"
REJECT_HOLD_EXPIRED = "hold_expired"


class Level(StrEnum):
    """A worker's memory pressure, against the warn and critical thresholds."""

    OK = "ok"
    WARN = "warn"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Thresholds:
    """The settings decisions depend on."""

    multi_gpu_threshold: int = 8000
    long_prompt_tokens: int = 2000
    warn: float = 0.85
    critical: float = 0.95
    hold_timeout: float = 120.0

    def level(self, pressure: float) -> Level:
        """The level of a pressure reading."""
        if pressure >= self.critical:
            return Level.CRITICAL
        return Level.WARN if pressure >= self.warn else Level.OK


@dataclass(frozen=True)
class WorkerState:
    """What the scheduler knows of one live worker (from its heartbeat)."""

    queue: str
    pressure: float
    free_slots: int = 1
    """Batch slots free now; a spill needs room on the other queue, a normal route only a queue."""
    name: str = ""


@dataclass(frozen=True)
class RouteDecision:
    """Which worker queue a job goes to, and why (a stable reason code)."""

    queue: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """The scheduler's answer for one job now: route it, hold it, or reject it."""

    action: Literal["route", "hold", "reject"]
    reason: str
    message: str
    queue: str | None = None


def route(prompt_tokens: int, threshold: int) -> RouteDecision:
    """Prompts over `threshold` tokens go to the multi-GPU queue, the rest to a single GPU."""
    if prompt_tokens > threshold:
        return RouteDecision(keys.MULTI_QUEUE, REASON_OVER_THRESHOLD)
    return RouteDecision(keys.SINGLE_QUEUE, REASON_WITHIN_THRESHOLD)


def can_take(worker: WorkerState, prompt_tokens: int, limits: Thresholds) -> bool:
    """A worker takes nothing new when critical, and no long prompt at warn."""
    level = limits.level(worker.pressure)
    if level is Level.CRITICAL:
        return False
    return not (level is Level.WARN and prompt_tokens > limits.long_prompt_tokens)


def place(
    prompt_tokens: int,
    workers: Sequence[WorkerState],
    waited: float,
    limits: Thresholds,
    affinity: str | None = None,
    affinity_reason: str = REASON_SESSION_AFFINITY,
) -> Decision:
    """Send a job to the worker it has an affinity for (`affinity`: the one holding its session's
    cache, or decoding an identical request: `affinity_reason`) while that worker is live, on the
    queue its size needs and can take it; else route by size, spill a gpu-single request to
    gpu-multi under pressure, else hold; a job held longer than `limits.hold_timeout` is rejected
    with the reason it was held."""
    sized = route(prompt_tokens, limits.multi_gpu_threshold)
    holder = next((w for w in workers if affinity and w.name == affinity), None)
    if holder is not None and holder.queue == sized.queue and can_take(holder, prompt_tokens, limits):
        message = (
            f"Worker {holder.name} holds this session's cache."
            if affinity_reason == REASON_SESSION_AFFINITY
            else f"Worker {holder.name} is decoding an identical request."
        )
        return Decision("route", affinity_reason, message, keys.own_queue(holder.name))
    on_target = [w for w in workers if w.queue == sized.queue]
    if any(can_take(w, prompt_tokens, limits) for w in on_target):
        return Decision("route", sized.reason, _route_message(sized, prompt_tokens, limits), sized.queue)
    # Never the reverse: a large prompt does not fit where gpu-single workers are.
    if sized.queue == keys.SINGLE_QUEUE and on_target:
        roomy = [w for w in workers if w.queue == keys.MULTI_QUEUE and limits.level(w.pressure) is Level.OK]
        if any(w.free_slots > 0 for w in roomy):
            message = "Every gpu-single worker is under memory pressure; gpu-multi has room."
            return Decision("route", REASON_PRESSURE_SPILL, message, keys.MULTI_QUEUE)
    hold = _hold(sized.queue, on_target, prompt_tokens, limits)
    if waited > limits.hold_timeout:
        message = f"Held {waited:.0f} s, over the {limits.hold_timeout:.0f} s limit: {hold.message}"
        return Decision("reject", REJECT_HOLD_EXPIRED, message)
    return hold


def _hold(queue: str, on_target: Sequence[WorkerState], prompt_tokens: int, limits: Thresholds) -> Decision:
    if not on_target:
        return Decision("hold", HOLD_NO_LIVE_WORKER, f"No live worker serves {queue}.")
    if all(limits.level(w.pressure) is Level.CRITICAL for w in on_target):
        return Decision(
            "hold", HOLD_MEMORY_CRITICAL, f"Every {queue} worker is over critical memory pressure."
        )
    # Some are at warn and none takes this prompt: it is a long one.
    return Decision(
        "hold",
        HOLD_MEMORY_WARN,
        f"Every {queue} worker is under memory pressure and takes no long prompt "
        f"({prompt_tokens} > {limits.long_prompt_tokens} tokens).",
    )


def _route_message(sized: RouteDecision, prompt_tokens: int, limits: Thresholds) -> str:
    relation = "over" if sized.reason == REASON_OVER_THRESHOLD else "within"
    return f"{prompt_tokens} prompt tokens, {relation} the {limits.multi_gpu_threshold}-token threshold."
