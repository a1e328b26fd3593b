"""The batch engine on its own: KV budget decisions, per-row sampling, and DecodeBatch against
single-request generation (fp32, so batched greedy output must match the single one)."""

from __future__ import annotations

import torch

from shared.contract import JobRequest
from shared.registry import model_spec
from tests.conftest import QUESTIONS, run_batch, sentence_request
from workers.batch import Row
from workers.kv_budget import KvBudget, budget_bytes, kv_bytes_per_token
from workers.runtime import ModelRuntime
from workers.sampling import Sampler, choose, sampler_for


def test_kv_bytes_per_token_counts_layers_heads_and_both_tensors() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, bf16.
    assert kv_bytes_per_token(30, 3, 64, 2) == 30 * 3 * 64 * 2 * 2


def test_budget_admits_while_the_padded_worst_case_fits() -> None:
    budget = KvBudget(bytes_per_token=10, budget=10 * 1000)
    assert budget.admits([], 5000)  # alone, always
    assert budget.admits([300, 200], 300)  # 3 rows x 300
    assert not budget.admits([300, 200, 300], 300)  # 4 x 300 = 1200 tokens > 1000
    assert not budget.admits([100], 600)  # 2 x 600: a long newcomer pads the short row too
    assert budget.worst_case([100, 250]) == 2 * 250 * 10
    assert budget_bytes(None, 1000) == 250 and budget_bytes(42, 1000) == 42


def test_samplers_are_per_row_and_seeded() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.1, 0.2]])
    greedy = sampler_for(JobRequest(prompt="x", temperature=0), "cpu")
    assert greedy.greedy
    seeded = [sampler_for(JobRequest(prompt="x", temperature=1.0, seed=7), "cpu") for _ in range(2)]
    draws = [[int(choose(logits, [greedy, s])[1]) for _ in range(20)] for s in seeded]
    assert draws[0] == draws[1]  # the same seed draws the same tokens
    assert int(choose(logits, [greedy, seeded[0]])[0]) == 1
    narrow = Sampler(1.0, 0.5, torch.Generator().manual_seed(1))  # top_p keeps only the top token
    assert {int(choose(logits, [narrow, greedy])[0]) for _ in range(20)} == {1}


def test_batched_greedy_matches_single_requests(fp32_runtime: ModelRuntime) -> None:
    requests = [sentence_request(t, max_tokens=6 + i) for i, t in enumerate(QUESTIONS)]
    single = [fp32_runtime.run(r).token_ids for r in requests]
    assert run_batch(fp32_runtime, requests) == single
    assert run_batch(fp32_runtime, requests, stagger=3) == single  # joining mid-flight, leaving early


def test_stop_strings_and_max_tokens_per_row(fp32_runtime: ModelRuntime) -> None:
    free = fp32_runtime.run(sentence_request("a cat", max_tokens=12))
    stop = free.text.split()[2]
    stopped = sentence_request("a cat", max_tokens=12, stop=[stop])
    tokens = run_batch(fp32_runtime, [stopped, sentence_request("the sea", max_tokens=3)])
    assert len(tokens[1]) == 3
    assert len(tokens[0]) < 12 and tokens[0] == free.token_ids[: len(tokens[0])]


def test_harmony_rows_batch_like_single_requests(prepared_models) -> None:  # type: ignore[no-untyped-def]
    from workers.tiny_model import CONVERSATIONS

    tiny = ModelRuntime.load(model_spec("tiny-gpt-oss"), prepared_models)  # fp32
    requests = [
        JobRequest(messages=[{"role": "user", "content": q}], max_tokens=40 + 10 * i, temperature=0)
        for i, (q, _, _) in enumerate(CONVERSATIONS[:4])
    ]
    single = [tiny.run(r) for r in requests]
    assert run_batch(tiny, requests, stagger=2) == [g.token_ids for g in single]
    batch = tiny.new_batch()
    rows = [Row(str(i), tiny.completion(r), sampler_for(r, "cpu")) for i, r in enumerate(requests)]
    batch.join(rows)
    while batch.rows:
        batch.drop({r.key for r in batch.rows if r.completion.ended})
        batch.step()
    results = [r.completion.result() for r in rows]
    assert [(g.text, g.reasoning, g.finish_reason) for g in results] == [
        (g.text, g.reasoning, g.finish_reason) for g in single
    ]
