"""The scheduler's decisions, as pure functions."""

from scheduler.routing import (
    REASON_OVER_THRESHOLD,
    REASON_WITHIN_THRESHOLD,
    REJECT_CONTEXT_EXCEEDED,
    REJECT_PROMPT_TOO_LONG,
    admit,
    route,
)
from shared import keys


def test_prompt_at_threshold_stays_single() -> None:
    decision = route(8000, 8000)
    assert decision.queue == keys.SINGLE_QUEUE
    assert decision.reason == REASON_WITHIN_THRESHOLD


def test_prompt_over_threshold_goes_multi() -> None:
    decision = route(8001, 8000)
    assert decision.queue == keys.MULTI_QUEUE
    assert decision.reason == REASON_OVER_THRESHOLD


def test_threshold_is_a_parameter() -> None:
    assert route(65, 64).queue == keys.MULTI_QUEUE
    assert route(64, 64).queue == keys.SINGLE_QUEUE


def test_admits_what_fits_the_context() -> None:
    assert admit(100, 100, 4096).admitted
    assert admit(100, 3996, 4096).admitted


def test_rejects_prompt_longer_than_context() -> None:
    decision = admit(4096, 1, 4096)
    assert not decision.admitted
    assert decision.code == REJECT_PROMPT_TOO_LONG
    assert "4096" in (decision.message or "")


def test_rejects_prompt_plus_max_tokens_over_context() -> None:
    decision = admit(100, 3997, 4096)
    assert not decision.admitted
    assert decision.code == REJECT_CONTEXT_EXCEEDED
    assert "3996" in (decision.message or "")
