"""Rows prefilled by length, and long prompts prefilled a chunk per step: the grouping rule, the
chunked batch against single-stream greedy output, and a batch of very different prompt lengths
through a real worker (real Redis, real RQ, SmolLM2 in fp32) giving every row its single-stream
greedy output, short prompts' first tokens before the long prompt's."""

from __future__ import annotations

from redis import Redis

from shared.contract import JobRequest
from shared.jobstore.rqstore import fetch_job
from tests.conftest import QUESTIONS, run_batch, sentence_request
from tests.test_batching import enqueue, stamps, work
from workers.batch import Row
from workers.prefill import PADDING_SLACK, prefill_groups
from workers.runtime import ModelRuntime
from workers.sampling import sampler_for

STORY = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))
"""A prompt of about 600 tokens."""


def summary_request(max_tokens: int = 6) -> JobRequest:
    return JobRequest(messages=[{"role": "user", "content": f"Summarise: {STORY}"}], max_tokens=max_tokens,
                      temperature=0)  # fmt: skip


def test_equal_prompts_prefill_in_one_pass() -> None:
    assert prefill_groups(list("abcd"), [40, 40, 40, 40]) == [["a", "b", "c", "d"]]


def test_short_prompts_go_first_and_apart_from_long_ones() -> None:
    groups = prefill_groups(["long", "s1", "mid", "s2"], [2000, 30, 400, 32])
    assert groups == [["s1", "s2"], ["mid"], ["long"]]


def test_a_group_pads_at_most_its_slack() -> None:
    lengths = [10, 11, 12, 13, 14, 15, 16, 30, 31, 90]
    for group in prefill_groups(lengths, lengths):
        assert max(group) * len(group) <= sum(group) * (1 + PADDING_SLACK)
    assert sorted(x for g in prefill_groups(lengths, lengths) for x in g) == lengths


def test_chunked_prefill_matches_single_requests(fp32_runtime: ModelRuntime) -> None:
    shorts = [sentence_request(t, max_tokens=5 + i) for i, t in enumerate(QUESTIONS[:3])]
    requests = [summary_request(), *shorts]
    single = [fp32_runtime.run(r).token_ids for r in requests]
    assert run_batch(fp32_runtime, requests, prefill_chunk=64) == single
    assert run_batch(fp32_runtime, requests, stagger=2, prefill_chunk=64) == single


def test_a_short_newcomer_is_not_held_by_a_long_prefill(fp32_runtime: ModelRuntime) -> None:
    batch = fp32_runtime.new_batch(prefill_chunk=64)
    requests = [summary_request(), sentence_request("a cat")]
    long, short = (
        Row(str(i), fp32_runtime.completion(r), sampler_for(r, "cpu")) for i, r in enumerate(requests)
    )
    batch.join([long])
    assert [w.row for w in batch.prefilling] == [long] and not long.completion.token_ids
    batch.step()  # one chunk of the long prompt
    batch.join([short])  # short enough to prefill at once: its first token now
    assert len(short.completion.token_ids) == 1 and not long.completion.token_ids
    steps = 0
    while not long.completion.token_ids:
        batch.step()
        steps += 1
    assert steps >= 5  # ~600 tokens in chunks of 64: the short row decoded all along
    assert len(short.completion.token_ids) == 1 + steps and batch.rows == [short, long]
    assert batch.drop({"0"}) == [long] and batch.drop({"1"}) == [short] and len(batch) == 0


def test_mixed_lengths_match_their_single_outputs(settings, redis: Redis, fp32_runtime: ModelRuntime) -> None:  # type: ignore[no-untyped-def]
    bodies = [
        {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0}
        for text in (f"Summarise: {STORY}", "Say hi.", "Name a colour.", "Count to three.")
    ]
    single = [fp32_runtime.run(JobRequest.model_validate(b)).text for b in bodies]
    ids = [enqueue(redis, b) for b in bodies]
    work(settings, redis, fp32_runtime, prefill_chunk=0)  # the whole long prompt at once
    assert [fetch_job(i, redis).return_value()["text"] for i in ids] == single
    long_first = stamps(redis, ids[0])["first_token"]
    # The short prompts were taken with the long one, and answered before its prefill ran.
    assert all(stamps(redis, i)["started"] < long_first for i in ids[1:])
    assert all(stamps(redis, i)["first_token"] < long_first for i in ids[1:])


def test_a_worker_prefills_long_prompts_in_chunks(settings, redis: Redis, fp32_runtime: ModelRuntime) -> None:  # type: ignore[no-untyped-def]
    bodies = [
        {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0}
        for text in (f"Summarise: {STORY}", "Say hi.")
    ]
    single = [fp32_runtime.run(JobRequest.model_validate(b)).text for b in bodies]
    ids = [enqueue(redis, b) for b in bodies]
    work(settings, redis, fp32_runtime, prefill_chunk=64)
    assert [fetch_job(i, redis).return_value()["text"] for i in ids] == single
    assert stamps(redis, ids[1])["first_token"] < stamps(redis, ids[0])["first_token"]
