"""Structured outputs and logprobs in the batch engine: rows decoded under a JSON schema's grammar
(llguidance) beside free rows, and each token's logprob from the same forward pass, equal to a
plain forward pass's (SmolLM2 in fp32; tiny-gpt-oss for harmony's final channel)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from shared.contract import JobRequest
from shared.registry import model_spec
from shared.structured import grammar_for
from tests.conftest import QUESTIONS, sentence_request
from workers.batch import Row
from workers.runtime import ModelRuntime
from workers.sampling import sampler_for

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def decode(runtime: Any, requests: list[JobRequest]) -> list[Row]:
    """`requests` decoded together in one batch to their ends; their rows."""
    batch = runtime.new_batch()
    rows = []
    for i, request in enumerate(requests):
        completion = runtime.completion(request)
        rows.append(Row(str(i), completion, sampler_for(request, "cpu", completion.constraint)))
    batch.join(rows)
    while batch.rows:
        batch.drop({r.key for r in batch.rows if r.completion.ended})
        if batch.rows:
            batch.step()
    return rows


def test_a_schema_that_cannot_be_used_is_refused_before_it_runs() -> None:
    with pytest.raises(ValueError, match="schema"):
        JobRequest(prompt="x", response_format={"type": "json_schema", "json_schema": {"name": "a",
                   "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}})  # fmt: skip
    with pytest.raises(ValueError, match="json_schema"):
        JobRequest(prompt="x", response_format={"type": "json_schema"})
    assert grammar_for({"type": "text"}) is None


def test_constrained_and_free_rows_share_a_batch(fp32_runtime: ModelRuntime) -> None:
    free = [sentence_request(t, max_tokens=10) for t in QUESTIONS[:2]]
    ask = "Describe {} as JSON."
    bound = [
        JobRequest.model_validate({"messages": [{"role": "user", "content": ask.format(t)}],
                                   "max_tokens": 120, "temperature": 0,
                                   "response_format": schema_format(PERSON)})
        for t in QUESTIONS[2:5]
    ] + [JobRequest.model_validate({"messages": [{"role": "user", "content": ask.format("a dog")}],
                                    "max_tokens": 120, "temperature": 0,
                                    "response_format": {"type": "json_object"}})]  # fmt: skip
    alone = [fp32_runtime.run(r).token_ids for r in free]
    rows = decode(fp32_runtime, free + bound)
    assert [tuple(r.completion.token_ids) for r in rows[:2]] == alone  # free rows: untouched
    for row in rows[2:5]:
        result = row.completion.result()
        assert result.finish_reason == "stop", result  # ended by the grammar, not cut by max_tokens
        jsonschema.validate(json.loads(result.text), PERSON)
    anything = rows[5].completion.result()  # any object: it may be long; what there is, is JSON's start
    assert anything.text.startswith("{") and rows[5].sampler.constraint is not None
    assert rows[5].sampler.constraint.error is None
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.text), dict)


def test_logprobs_are_the_forward_pass_log_probabilities(fp32_runtime: ModelRuntime) -> None:
    requests = [
        sentence_request("a cat", max_tokens=8, logprobs=True, top_logprobs=3),
        sentence_request("the sea", max_tokens=8, temperature=0.8, seed=1, logprobs=True, top_logprobs=0),
    ]
    for row, request in zip(decode(fp32_runtime, requests), requests, strict=True):
        result = row.completion.result()
        ids = list(row.completion.prompt_ids) + list(result.token_ids)
        with torch.inference_mode():
            logits = fp32_runtime.model(torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        start = len(row.completion.prompt_ids) - 1
        assert result.logprobs is not None
        content = [t for t in result.token_ids if t not in row.completion.eos]
        assert [t.token for t in result.logprobs] == content
        for k, taken in enumerate(result.logprobs):
            assert abs(taken.logprob - float(expected[start + k, taken.token])) < 1e-3
            assert len(taken.top) == (request.top_logprobs or 0)
            for token, value in taken.top:
                assert abs(value - float(expected[start + k, token])) < 1e-3
            if taken.top:
                assert taken.top[0][1] >= taken.top[-1][1]


def test_harmony_structured_outputs_govern_the_final_message_only(prepared_models) -> None:  # type: ignore[no-untyped-def]
    tiny = ModelRuntime.load(model_spec("tiny-gpt-oss"), prepared_models)
    request = JobRequest.model_validate({"messages": [{"role": "user", "content": "What is 2+2?"}],
                                         "max_tokens": 200, "temperature": 0, "logprobs": True,
                                         "response_format": schema_format(PERSON)})  # fmt: skip
    row = decode(tiny, [request])[0]
    result = row.completion.result()
    assert result.reasoning  # the analysis channel ran free
    jsonschema.validate(json.loads(result.text), PERSON)
    assert result.logprobs is not None and tiny.chat is not None
    # Logprobs cover the final message's tokens only: they spell its text.
    assert tiny.chat.decode([t.token for t in result.logprobs]) == result.text


def test_n_choices_are_rows_sharing_one_prefill(fp32_runtime: ModelRuntime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from workers.batch import DecodeBatch
    from workers.slots import request_row

    forward, shapes = DecodeBatch._forward, []

    def counted(batch: DecodeBatch, ids: torch.Tensor, *rest: Any) -> Any:
        shapes.append(tuple(ids.shape))
        return forward(batch, ids, *rest)

    monkeypatch.setattr(DecodeBatch, "_forward", counted)
    request = sentence_request("a cat", max_tokens=10, temperature=1.0, seed=7, n=3)
    row = request_row("job", fp32_runtime, request, fp32_runtime.completion(request), "cpu")
    batch = fp32_runtime.new_batch()
    batch.join([row])
    assert shapes[0][0] == 1 and len(batch.rows) == 3  # one prompt prefilled, three rows decoding
    while not row.ended:
        batch.step()
    texts = [r.completion.result().token_ids for r in [row, *row.siblings]]
    assert len(set(texts)) == 3  # each choice samples on its own
    again = request_row("job", fp32_runtime, request, fp32_runtime.completion(request), "cpu")
    batch = fp32_runtime.new_batch()
    batch.join([again])
    while not again.ended:
        batch.step()
    assert [r.completion.result().token_ids for r in [again, *again.siblings]] == texts  # seeded: the same
    assert {r.key for r in batch.drop({"job"})} == {"job"} and not batch.rows
