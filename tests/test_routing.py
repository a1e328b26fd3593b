"""The scheduler's decisions, as pure functions."""

from scheduler.routing import (
    HOLD_MEMORY_CRITICAL,
    HOLD_MEMORY_WARN,
    HOLD_NO_LIVE_WORKER,
    REASON_IDENTICAL_DECODING,
    REASON_OVER_THRESHOLD,
    REASON_PRESSURE_SPILL,
    REASON_SESSION_AFFINITY,
    REASON_WITHIN_THRESHOLD,
    REJECT_HOLD_EXPIRED,
    Decision,
    Level,
    Thresholds,
    WorkerState,
    place,
    route,
)
from shared import keys
from shared.context_fit import REJECT_CONTEXT_EXCEEDED, REJECT_PROMPT_TOO_LONG, admit


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


# place(): size, pressure, hold and the hold deadline.

LIMITS = Thresholds(
    multi_gpu_threshold=8000, long_prompt_tokens=2000, warn=0.85, critical=0.95, hold_timeout=60
)
SINGLE_OK = WorkerState(keys.SINGLE_QUEUE, 0.10)
SINGLE_WARN = WorkerState(keys.SINGLE_QUEUE, 0.90)
SINGLE_CRITICAL = WorkerState(keys.SINGLE_QUEUE, 0.97)
MULTI_OK = WorkerState(keys.MULTI_QUEUE, 0.20)
MULTI_WARN = WorkerState(keys.MULTI_QUEUE, 0.86)
MULTI_CRITICAL = WorkerState(keys.MULTI_QUEUE, 0.99)


def test_levels() -> None:
    assert LIMITS.level(0.84) is Level.OK
    assert LIMITS.level(0.85) is Level.WARN
    assert LIMITS.level(0.95) is Level.CRITICAL


def test_healthy_workers_get_the_size_route() -> None:
    assert place(100, [SINGLE_OK, MULTI_OK], 0, LIMITS) == Decision(
        "route",
        REASON_WITHIN_THRESHOLD,
        place(100, [SINGLE_OK, MULTI_OK], 0, LIMITS).message,
        keys.SINGLE_QUEUE,
    )
    big = place(9000, [SINGLE_OK, MULTI_OK], 0, LIMITS)
    assert (big.action, big.queue, big.reason) == ("route", keys.MULTI_QUEUE, REASON_OVER_THRESHOLD)


def test_one_healthy_worker_on_the_queue_is_enough() -> None:
    decision = place(100, [SINGLE_CRITICAL, SINGLE_OK], 0, LIMITS)
    assert (decision.action, decision.queue) == ("route", keys.SINGLE_QUEUE)


def test_warn_still_takes_short_prompts() -> None:
    decision = place(500, [SINGLE_WARN, MULTI_CRITICAL], 0, LIMITS)
    assert (decision.action, decision.queue, decision.reason) == (
        "route",
        keys.SINGLE_QUEUE,
        REASON_WITHIN_THRESHOLD,
    )


def test_medium_request_spills_to_multi_when_single_is_pressed() -> None:
    for pressed in (SINGLE_CRITICAL, SINGLE_WARN):
        decision = place(3000, [pressed, MULTI_OK], 0, LIMITS)
        assert (decision.action, decision.queue, decision.reason) == (
            "route",
            keys.MULTI_QUEUE,
            REASON_PRESSURE_SPILL,
        )


def test_no_spill_when_multi_has_no_room() -> None:
    assert place(100, [SINGLE_CRITICAL, MULTI_WARN], 0, LIMITS).action == "hold"
    full = WorkerState(keys.MULTI_QUEUE, 0.1, free_slots=0)
    assert place(100, [SINGLE_CRITICAL, full], 0, LIMITS).action == "hold"


def test_large_request_never_goes_to_single() -> None:
    decision = place(9000, [SINGLE_OK, MULTI_CRITICAL], 0, LIMITS)
    assert (decision.action, decision.reason) == ("hold", HOLD_MEMORY_CRITICAL)


def test_all_critical_holds() -> None:
    decision = place(100, [SINGLE_CRITICAL, MULTI_CRITICAL], 10, LIMITS)
    assert (decision.action, decision.reason, decision.queue) == ("hold", HOLD_MEMORY_CRITICAL, None)


def test_long_prompt_at_warn_holds() -> None:
    decision = place(3000, [SINGLE_WARN, MULTI_WARN], 0, LIMITS)
    assert (decision.action, decision.reason) == ("hold", HOLD_MEMORY_WARN)


def test_no_live_worker_holds_then_rejects() -> None:
    assert place(100, [MULTI_OK], 0, LIMITS) == Decision(
        "hold", HOLD_NO_LIVE_WORKER, "No live worker serves gpu-single."
    )
    late = place(100, [MULTI_OK], 61, LIMITS)
    assert (late.action, late.reason) == ("reject", REJECT_HOLD_EXPIRED)
    assert "No live worker serves gpu-single" in late.message


def test_hold_deadline_applies_to_pressure_too() -> None:
    assert place(100, [SINGLE_CRITICAL, MULTI_CRITICAL], 59, LIMITS).action == "hold"
    assert place(100, [SINGLE_CRITICAL, MULTI_CRITICAL], 61, LIMITS).action == "reject"


def test_routable_job_is_routed_even_after_a_long_wait() -> None:
    assert place(100, [SINGLE_OK], 3600, LIMITS).action == "route"


# place() with a session's affinity: the worker holding its cache, while it can take the turn.


def test_a_session_turn_goes_to_the_worker_holding_its_cache() -> None:
    holder = WorkerState(keys.SINGLE_QUEUE, 0.10, name="w2")
    decision = place(100, [SINGLE_OK, holder, MULTI_OK], 0, LIMITS, affinity="w2")
    assert (decision.action, decision.queue, decision.reason) == (
        "route",
        keys.own_queue("w2"),
        REASON_SESSION_AFFINITY,
    )


def test_a_request_identical_to_one_decoding_goes_to_that_worker() -> None:
    decoding = WorkerState(keys.SINGLE_QUEUE, 0.10, name="w2")
    decision = place(100, [SINGLE_OK, decoding], 0, LIMITS, "w2", REASON_IDENTICAL_DECODING)
    assert (decision.queue, decision.reason) == (keys.own_queue("w2"), REASON_IDENTICAL_DECODING)
    assert "decoding an identical request" in decision.message
    gone = place(100, [SINGLE_OK], 0, LIMITS, "w2", REASON_IDENTICAL_DECODING)
    assert (gone.queue, gone.reason) == (keys.SINGLE_QUEUE, REASON_WITHIN_THRESHOLD)


def test_lost_or_unfit_affinity_falls_back_to_normal_routing() -> None:
    gone = place(100, [SINGLE_OK], 0, LIMITS, affinity="w2")  # w2 has no live heartbeat
    assert (gone.queue, gone.reason) == (keys.SINGLE_QUEUE, REASON_WITHIN_THRESHOLD)
    critical = WorkerState(keys.SINGLE_QUEUE, 0.97, name="w2")
    pressed = place(100, [SINGLE_OK, critical], 0, LIMITS, affinity="w2")
    assert (pressed.queue, pressed.reason) == (keys.SINGLE_QUEUE, REASON_WITHIN_THRESHOLD)
    grown = place(9000, [WorkerState(keys.SINGLE_QUEUE, 0.1, name="w2"), MULTI_OK], 0, LIMITS, affinity="w2")
    assert (grown.queue, grown.reason) == (keys.MULTI_QUEUE, REASON_OVER_THRESHOLD)  # outgrew gpu-single


def test_a_handed_back_session_turn_is_routed_afresh() -> None:
    assert keys.requeue_target(keys.own_queue("w2"), "high") == keys.priority_queue(
        keys.INCOMING_QUEUE, "high"
    )
    assert keys.requeue_target(keys.SINGLE_QUEUE, "high") == keys.SINGLE_QUEUE
