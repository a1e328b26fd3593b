"""The OpenAI-compatible endpoints, called with the official `openai` package against the real
processes (gunicorn API, scheduler, worker) on tiny-gpt-oss, with a real API key."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
import requests

from tests.conftest import Stack, start_stack
from workers.tiny_model import CONVERSATIONS


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running, procs = start_stack(
        redis_url, prepared_models.cache_dir, tmp_path_factory.mktemp("openai"), "tiny-gpt-oss"
    )
    try:
        yield running
    finally:
        procs.stop_all()


def test_models_list(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == ["tiny-gpt-oss"]
    assert stack.client().models.retrieve("tiny").id == "tiny-gpt-oss"  # an alias names it too
    with pytest.raises(openai.NotFoundError):
        stack.client().models.retrieve("gpt-4o")


def test_chat_completion_with_reasoning_content(stack: Stack) -> None:
    question, analysis, final = CONVERSATIONS[0]
    raw = stack.client().chat.completions.with_raw_response.create(
        model="tiny-gpt-oss",
        messages=[{"role": "user", "content": question}],
        max_tokens=80,
        temperature=0,
        reasoning_effort="low",
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    message = completion.choices[0].message
    assert message.content == final
    assert message.model_extra is not None and message.model_extra["reasoning_content"] == analysis
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    job_id = raw.headers["x-job-id"]
    assert completion.id == f"chatcmpl-{job_id}" and len(raw.headers["x-trace-id"]) == 32
    # The same job, visible through the async API.
    view = requests.get(f"{stack.base}/v1/jobs/{job_id}", headers=stack.headers(), timeout=5).json()
    assert view["status"] == "finished" and view["result"]["text"] == final


def test_streamed_chat_completion_sends_reasoning_then_content(stack: Stack) -> None:
    question, analysis, final = CONVERSATIONS[1]
    chunks = list(
        stack.client().chat.completions.create(
            model="tiny-gpt-oss",
            messages=[{"role": "user", "content": question}],
            max_tokens=80,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == analysis and content == final
    assert sum(1 for d in deltas if d.content) >= 2  # the answer came in pieces, not at once
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_text_completion(stack: Stack) -> None:
    question, _, final = CONVERSATIONS[2]
    completion = stack.client().completions.create(
        model="tiny-gpt-oss", prompt=question, max_tokens=80, temperature=0
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == final and completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0


def test_streamed_text_completion_ends_with_done(stack: Stack) -> None:
    question, _, final = CONVERSATIONS[2]
    body = {"model": "tiny-gpt-oss", "prompt": question, "max_tokens": 80, "temperature": 0, "stream": True}
    with requests.post(
        f"{stack.base}/v1/completions", json=body, headers=stack.headers(), stream=True, timeout=60
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        assert response.headers["x-job-id"]
        data = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == final
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_errors_come_back_as_openai_errors(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny-gpt-oss", messages=[], max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.base}/v1", api_key="wrong", max_retries=0).models.list()
