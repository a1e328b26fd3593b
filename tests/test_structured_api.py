"""Structured outputs and logprobs through the whole pipeline with the official `openai` client on
SmolLM2: every answer under a JSON schema parses and validates (10 schemas, bench/structured.py runs
200 requests), legacy completions' logprobs, and the refusals (a schema that cannot be used, logprobs
with stream, `n` > 1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
import requests

from tests.conftest import Stack, start_stack

BAD = {"type": "nope"}
"""A schema no grammar can be made of."""

SCHEMAS = json.loads((Path(__file__).resolve().parent.parent / "bench" / "data" / "schemas.json").read_text())


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    running, procs = start_stack(
        redis_url, prepared_models.cache_dir, tmp_path_factory.mktemp("structured"), "smollm2-135m",
        GPTOSS_MAX_BATCH_SIZE=8, GPTOSS_RESPONSE_CACHE="false",
    )  # fmt: skip
    try:
        yield running
    finally:
        procs.stop_all()


def test_every_answer_under_a_schema_parses_and_validates(stack: Stack) -> None:
    client = stack.client(timeout=300)

    def ask(case: tuple[dict, str]) -> tuple[str, str | None, str]:
        entry, topic = case
        answer = client.chat.completions.create(
            model="smollm2-135m", max_tokens=200, temperature=0,
            messages=[{"role": "user", "content": f"Give a {entry['name']} about {topic} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {**entry, "strict": True}},
        )  # fmt: skip
        return entry["name"], answer.choices[0].finish_reason, answer.choices[0].message.content or ""

    cases = [(entry, topic) for entry in SCHEMAS for topic in ("the sea", "a robot")]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases))
    for (entry, _), (name, finish, text) in zip(cases, answers, strict=True):
        assert finish == "stop", (name, text)  # cut by max_tokens counts as a failure
        jsonschema.validate(json.loads(text), entry["schema"])


def test_chat_logprobs_are_the_answers_tokens(stack: Stack) -> None:
    answer = stack.client().chat.completions.create(
        model="smollm2-135m", max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": "Write one sentence about a cat."}],
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert bytes(token.bytes or []).decode("utf-8", "replace") == token.token
        # Greedy: the chosen token is the most likely one (its logprob is the top alternative's).
        assert abs(token.logprob - token.top_logprobs[0].logprob) < 1e-6


def test_completion_logprobs_in_the_legacy_format(stack: Stack) -> None:
    answer = stack.client().completions.create(
        model="smollm2-135m", prompt="The sea is", max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD}}},
         "validation_error"),
        ({"response_format": {"type": "json_schema"}}, "validation_error"),
        ({"response_format": {"type": "yaml"}}, "validation_error"),
        ({"top_logprobs": 2}, "validation_error"),
        ({"top_logprobs": 21, "logprobs": True}, "validation_error"),
        ({"n": 2, "stream": True}, "unsupported_parameter"),
        ({"n": 17}, "validation_error"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused_by_name(stack: Stack, extra: dict, code: str) -> None:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], **extra}
    answer = requests.post(f"{stack.base}/v1/chat/completions", json=body, timeout=30,
                           headers={"Authorization": f"Bearer {stack.key}"})  # fmt: skip
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == code


def test_the_official_client_sees_a_refused_schema_as_a_bad_request(stack: Stack) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        stack.client().chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "a"}}},
        )  # fmt: skip


def test_n_choices_come_from_one_job(stack: Stack) -> None:
    client = stack.client()
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", max_tokens=12, temperature=1.0, seed=3, n=3, logprobs=True,
        messages=[{"role": "user", "content": "Write one sentence about rain."}],
    )  # fmt: skip
    answer = raw.parse()
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1  # sampled apart
    assert all(c.logprobs is not None and c.logprobs.content for c in answer.choices)
    job = requests.get(f"{stack.base}/v1/jobs/{raw.headers['X-Job-ID']}", timeout=10,
                       headers={"Authorization": f"Bearer {stack.key}"}).json()  # fmt: skip
    assert len(job["result"]["choices"]) == 3  # one job holds them all
    assert answer.usage is not None
    # Every choice's tokens are counted (its end token too, which has no content logprob).
    content_tokens = sum(len(c.logprobs.content or []) for c in answer.choices if c.logprobs)
    assert content_tokens <= answer.usage.completion_tokens <= content_tokens + 3
    texts = client.completions.create(model="smollm2-135m", prompt="The sea is", max_tokens=5, n=2,
                                      temperature=0)  # fmt: skip
    assert [c.index for c in texts.choices] == [0, 1] and texts.choices[0].text == texts.choices[1].text


def test_streamed_logprobs_arrive_with_their_text(stack: Stack) -> None:
    ask = {"model": "smollm2-135m", "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2,
           "messages": [{"role": "user", "content": "Write one sentence about a cat."}]}  # fmt: skip
    whole = stack.client().chat.completions.create(**ask)  # type: ignore[call-overload]
    streamed = stack.client().chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
    text, tokens = "", []
    for chunk in streamed:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                tokens += choice.logprobs.content
                assert choice.delta.content  # logprobs travel with the text they made
    assert text == whole.choices[0].message.content
    assert whole.choices[0].logprobs is not None
    assert [(t.token, round(t.logprob, 4)) for t in tokens] == [
        (t.token, round(t.logprob, 4)) for t in whole.choices[0].logprobs.content or []
    ]
    legacy = stack.client().completions.create(model="smollm2-135m", prompt="The sea is", max_tokens=6,
                                               temperature=0, logprobs=1, stream=True)  # fmt: skip
    pieces = [(c.choices[0].text, c.choices[0].logprobs) for c in legacy if c.choices]
    assert any(lp is not None and lp.tokens for _, lp in pieces)
