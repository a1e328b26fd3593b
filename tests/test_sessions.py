"""Session KV reuse inside a worker: the prefix decision, the bounded store, and a second turn that
reuses its first turn's keys and values yet decodes exactly what a cold run does (fp32, greedy)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.contract import JobRequest
from shared.registry import model_spec
from workers.batch import Row
from workers.runtime import ModelRuntime
from workers.sampling import sampler_for
from workers.sessions import SessionStore, reusable_prefix, session_budget, session_key


def test_reusable_prefix_is_the_common_start_keeping_one_token_to_compute() -> None:
    assert reusable_prefix([1, 2, 3, 4], [1, 2, 3, 4, 5, 6]) == 4
    assert reusable_prefix([1, 2, 9, 4], [1, 2, 3, 4, 5]) == 2  # diverged at the third token
    assert reusable_prefix([1, 2, 3], [1, 2, 3]) == 2  # the last prompt token is computed again
    assert reusable_prefix([7, 8], [1, 2, 3]) == 0
    assert reusable_prefix([], [1]) == 0


def layers(tokens: int, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of `tokens` tokens: 2 heads of 4 fp32 values, 32 bytes per tensor per token."""
    return [(torch.randn(1, 2, tokens, 4), torch.randn(1, 2, tokens, 4)) for _ in range(count)]


def test_store_evicts_least_recently_used_beyond_its_budget() -> None:
    per_token = 2 * 2 * (2 * 4 * 4)  # two layers, keys and values, 2 heads of 4 fp32
    store = SessionStore(budget=25 * per_token, ttl=60)
    assert store.put("a", list(range(10)), layers(10))
    assert store.put("b", list(range(10)), layers(10))
    assert store.take("a", list(range(12))) is not None  # a is now the most recently used
    assert store.put("c", list(range(10)), layers(10))  # 30 tokens > 25: b goes
    assert "b" not in store and "a" in store and "c" in store
    assert store.nbytes == 20 * per_token
    assert not store.put("huge", list(range(30)), layers(30))  # over the budget alone: not kept
    assert "huge" not in store and store.nbytes == 20 * per_token
    assert store.shed() == 20 * per_token and len(store) == 0 and store.nbytes == 0


def test_store_hands_out_the_shared_prefix_and_forgets_idle_sessions() -> None:
    now = [0.0]
    store = SessionStore(budget=10**6, ttl=30, clock=lambda: now[0])
    kept = layers(6)
    store.put("t:s", [1, 2, 3, 4, 5, 6], kept)
    prefix = store.take("t:s", [1, 2, 3, 4, 9, 9])
    assert prefix is not None and prefix.length == 4
    assert torch.equal(prefix.layers[0][0], kept[0][0][:, :, :4])
    assert store.take("t:s", [5, 5, 5]) is None  # nothing shared: a full prefill
    assert store.take("other:s", [1, 2, 3, 4, 5]) is None
    now[0] = 29.0
    store.expire()
    assert "t:s" in store  # used at 0 s, 29 s ago... still within 30 s
    now[0] = 100.0
    store.expire()
    assert "t:s" not in store and store.nbytes == 0


def test_session_keys_and_budget() -> None:
    assert session_key("acme", "chat-1") != session_key("other", "chat-1")
    assert session_budget(None, 1000) == 100 and session_budget(0, 1000) == 0


@pytest.fixture(scope="module")
def fp32_smollm(prepared_models) -> ModelRuntime:  # type: ignore[no-untyped-def]
    spec = model_spec("smollm2-135m")
    folder = spec.directory(prepared_models.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return ModelRuntime(spec, model, AutoTokenizer.from_pretrained(str(folder)), "cpu")


def decode(runtime: ModelRuntime, rows: list[Row], store: SessionStore | None = None) -> None:
    """Decode `rows` in one batch to their ends; a row keyed like a session leaves its state in `store`."""
    batch = runtime.new_batch()
    batch.join(rows)
    while batch.rows:
        ended = {r.key for r in batch.rows if r.completion.ended}
        for key in ended:
            state = batch.row_state(key)
            if store is not None and state is not None:
                store.put(key, *state)
        batch.drop(ended)
        batch.step()


def second_turn_reuses_its_prefix(runtime: ModelRuntime, first: list[dict[str, str]], follow_up: str) -> None:
    store = SessionStore(budget=10**9, ttl=60)
    turn1 = JobRequest(messages=first, max_tokens=24, temperature=0)
    row = Row("t:s", runtime.completion(turn1), sampler_for(turn1, "cpu"))
    other = JobRequest(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, temperature=0)
    decode(runtime, [row, Row("other", runtime.completion(other), sampler_for(other, "cpu"))], store)
    reply = row.completion.result()
    assert "t:s" in store

    turn2 = JobRequest(
        messages=[
            *first,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": follow_up},
        ],
        max_tokens=16,
        temperature=0,
    )
    cold = runtime.run(turn2)
    completion = runtime.completion(turn2)
    prefix = store.take("t:s", completion.prompt_ids)
    assert prefix is not None and prefix.length >= len(row.completion.prompt_ids)  # turn 1's prompt at least
    completion.cached_tokens = prefix.length
    warm = Row("t:s", completion, sampler_for(turn2, "cpu"), prefix=prefix)
    late = JobRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    decode(runtime, [Row("late", runtime.completion(late), sampler_for(late, "cpu")), warm])
    result = completion.result()
    assert result.token_ids == cold.token_ids
    assert result.text == cold.text
    assert result.cached_tokens == prefix.length and result.prompt_tokens == cold.prompt_tokens


def test_second_turn_reuses_the_first_turns_cache_and_decodes_like_a_cold_run(
    fp32_smollm: ModelRuntime,
) -> None:
    first = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Tell me one fact about the moon."},
    ]
    second_turn_reuses_its_prefix(fp32_smollm, first, "And one about the sun?")


def test_harmony_second_turn_reuses_its_prefix(prepared_models) -> None:  # type: ignore[no-untyped-def]
    from workers.tiny_model import CONVERSATIONS

    tiny = ModelRuntime.load(model_spec("tiny-gpt-oss"), prepared_models)  # fp32
    question, _, _ = CONVERSATIONS[0]
    second_turn_reuses_its_prefix(tiny, [{"role": "user", "content": question}], CONVERSATIONS[1][0])
