"""Admission and routing decisions: pure functions over plain data."""

from __future__ import annotations

from dataclasses import dataclass

from shared import keys

REASON_WITHIN_THRESHOLD = "within_threshold"
REASON_OVER_THRESHOLD = "over_threshold"
REJECT_PROMPT_TOO_LONG = "prompt_too_long"
REJECT_CONTEXT_EXCEEDED = "context_exceeded"


@dataclass(frozen=True)
class RouteDecision:
    """Which worker queue a job goes to, and why (a stable reason code)."""

    queue: str
    reason: str


@dataclass(frozen=True)
class Admission:
    """Whether a job may run at all; when not, a stable code and a message the user can act on."""

    admitted: bool
    code: str | None = None
    message: str | None = None


def admit(prompt_tokens: int, max_tokens: int, context_length: int) -> Admission:
    """Admit a job whose prompt and requested new tokens fit the model's context."""
    if prompt_tokens >= context_length:
        return Admission(
            False,
            REJECT_PROMPT_TOO_LONG,
            f"The prompt has {prompt_tokens} tokens; the model's context is {context_length}.",
        )
    if prompt_tokens + max_tokens > context_length:
        return Admission(
            False,
            REJECT_CONTEXT_EXCEEDED,
            f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over the model's "
            f"context of {context_length}; lower max_tokens to {context_length - prompt_tokens} or less.",
        )
    return Admission(True)


def route(prompt_tokens: int, threshold: int) -> RouteDecision:
    """Prompts over `threshold` tokens go to the multi-GPU queue, the rest to a single GPU."""
    if prompt_tokens > threshold:
        return RouteDecision(keys.MULTI_QUEUE, REASON_OVER_THRESHOLD)
    return RouteDecision(keys.SINGLE_QUEUE, REASON_WITHIN_THRESHOLD)
