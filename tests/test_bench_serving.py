"""The pure parts of bench/serving.py: percentiles, the seeded Poisson schedule, reading an OpenAI
stream's chunks, inter-token gaps and one load level's summary. No processes, no clock."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.latency import Outcome, Slo, gaps, percentile, poisson_arrivals, summarise
from bench.traffic import Prompt, draw, load_prompts, read_chunk, sse_data


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([float(i) for i in range(1, 101)], 0.95) == pytest.approx(95.05)


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate() -> None:
    times = poisson_arrivals(2.0, 4000, seed=7)
    assert times == poisson_arrivals(2.0, 4000, seed=7)
    assert times != poisson_arrivals(2.0, 4000, seed=8)
    assert times[0] == 0.0 and times == sorted(times)
    assert statistics.fmean(gaps(times)) == pytest.approx(0.5, rel=0.05)


def test_gaps_are_the_time_between_chunks() -> None:
    assert gaps([1.0, 1.25, 1.25, 2.0]) == [0.25, 0.0, 0.75]
    assert gaps([1.0]) == []


def chunk(content: str | None = None, usage: dict[str, int] | None = None) -> str:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return json.dumps({"object": "chat.completion.chunk", "choices": choices, "usage": usage})


def test_a_stream_read_chunk_by_chunk() -> None:
    body = [": keep-alive", "", f"data: {chunk('')}", f"data: {chunk('Hel')}", "", f"data: {chunk('lo')}",
            f"data: {chunk(usage={'prompt_tokens': 9, 'completion_tokens': 2, 'total_tokens': 11})}",
            "data: [DONE]", f"data: {chunk('never read')}"]  # fmt: skip
    outcome = Outcome("p1", sent=10.0)
    for now, payload in enumerate(sse_data(iter(body)), start=11):
        if not read_chunk(outcome, payload, float(now)):
            break
    assert outcome.chunks == [12.0, 13.0]  # the role-only opening chunk has no text
    assert (outcome.output_tokens, outcome.prompt_tokens) == (2, 9)
    outcome.ended = 15.0
    assert outcome.ok and outcome.ttft == 2.0 and outcome.e2e == 5.0 and outcome.tpot() == 3.0
    kept = outcome.record(start=4.0)
    assert (kept["sent"], kept["ended"], kept["chunks"], kept["ttft"]) == (6.0, 11.0, [2.0, 3.0], 2.0)


def test_an_error_chunk_ends_the_stream_as_failed() -> None:
    outcome = Outcome("p1", sent=0.0)
    assert not read_chunk(outcome, json.dumps({"error": {"code": "job_failed", "message": "x"}}), 1.0)
    assert outcome.error == "job_failed" and not outcome.ok
    other = Outcome("p2", sent=0.0)
    assert not read_chunk(other, json.dumps({"error": "boom"}), 1.0)
    assert other.error == "boom"


def test_summary_of_one_load_level() -> None:
    slo = Slo(ttft_s=1.0, e2e_s=5.0, source="test")
    fast = Outcome("a", sent=0.0, chunks=[0.5, 0.6, 0.7], ended=1.0, output_tokens=3)
    slow_start = Outcome("b", sent=1.0, chunks=[3.0, 3.5], ended=4.0, output_tokens=2)
    long = Outcome("c", sent=2.0, chunks=[2.5, 8.0], ended=10.0, output_tokens=2)
    failed = Outcome("d", sent=3.0, ended=3.1, error="HTTP 429")
    s = summarise([fast, slow_start, long, failed], slo)
    assert (s["requests"], s["succeeded"], s["failed"], s["errors"]) == (4, 3, 1, ["HTTP 429"])
    assert s["seconds"] == 10.0 and s["requests_per_second"] == pytest.approx(0.3)
    assert s["output_tokens"] == 7 and s["output_tokens_per_second"] == pytest.approx(0.7)
    assert s["ttft_s"]["p50"] == pytest.approx(0.5)
    assert s["itl_s"]["p50"] == pytest.approx(0.3)  # gaps 0.1, 0.1, 0.5, 5.5 pooled
    assert (s["ttft_met"], s["e2e_met"], s["goodput_fraction"]) == (0.5, 0.5, 0.25)
    assert s["goodput_requests_per_second"] == pytest.approx(0.1)


def test_the_shipped_prompts_spread_over_lengths_and_draw_reproducibly() -> None:
    prompts = load_prompts()
    lengths = [p.prompt_tokens for p in prompts]
    assert len(prompts) >= 100 and min(lengths) <= 40 and 1000 <= max(lengths) <= 2000
    assert all(p.max_tokens >= 16 and p.messages[-1]["role"] == "user" for p in prompts)
    assert draw(prompts, 50, seed=3) == draw(prompts, 50, seed=3)
    assert len({p.id for p in draw(prompts, 50, seed=3)}) == 50
    more = draw(prompts[:5], 8, seed=1)
    assert len(more) == 8 and all(isinstance(p, Prompt) for p in more)
