"""Tool calling (issue #22), with the official `openai` client against the real processes on
tiny-gpt-oss, which was trained to call functions: a whole agent loop (call → the client runs the
function → `role: "tool"` → the answer), streamed and not, several calls in one turn, `tool_choice`
honoured, the same calls through `POST /v1/jobs`; and every malformed tool request refused with a
stable code before a job exists (against the app and a real Redis)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from redis import Redis

from api import create_app
from shared import keys
from shared.jobstore.rqstore import open_queue
from tests.conftest import Stack, start_stack, wait_for
from workers.tiny_tools import (
    BOTH_ANSWER,
    BOTH_QUESTION,
    PARIS,
    PLAIN_ANSWER,
    PLAIN_QUESTION,
    TOOLS,
    WEATHER_ANSWER,
    WEATHER_QUESTION,
    WEATHER_REASONING,
    run_tool,
)

MODEL = "tiny-gpt-oss"
CHAT = "/v1/chat/completions"
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The response cache on: a repeated greedy request is answered from it (streams of tool calls too).
    folder = tmp_path_factory.mktemp("tools")
    running, procs = start_stack(
        redis_url, prepared_models.cache_dir, folder, MODEL, GPTOSS_RESPONSE_CACHE="true"
    )
    try:
        yield running
    finally:
        procs.stop_all()


def ask(stack: Stack, messages: list[Any], **params: Any) -> Any:
    """A greedy chat completion offering the two functions (the raw response: headers and all)."""
    return stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=100, **params
    )


def calls_of(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def results_of(message: Any) -> list[dict[str, str]]:
    """The client runs each function the model called: one `role: "tool"` message per call."""
    return [
        {"role": "tool", "tool_call_id": c.id, "content": run_tool(c.function.name, c.function.arguments)}
        for c in message.tool_calls
    ]


def job_result(stack: Stack, job_id: str) -> dict[str, Any]:
    view: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal view
        view = requests.get(f"{stack.base}/v1/jobs/{job_id}", headers=stack.headers(), timeout=5).json()
        return view["status"] in ("finished", "failed")

    wait_for(finished, 120, f"job {job_id} to end", interval=0.2)
    assert view["status"] == "finished", view
    return view["result"]


def streamed(stack: Stack, messages: list[Any], **params: Any) -> tuple[str, list[Any]]:
    """A streamed completion: its job id and every chunk."""
    raw = ask(stack, messages, stream=True, **params)
    return raw.headers["x-job-id"], list(raw.parse())


def reassembled(chunks: list[Any]) -> list[dict[str, str]]:
    """The calls of a stream, put together from `delta.tool_calls` as an OpenAI client does: a call's
    first chunk carries its id, type and name (and empty arguments), later ones argument fragments."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.index not in calls:
                assert delta.id and delta.type == "function" and delta.function.name
                assert delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def test_agent_loop_calls_a_function_then_answers_from_its_result(stack: Stack) -> None:
    question = [{"role": "user", "content": WEATHER_QUESTION}]
    raw = ask(stack, question)
    first = raw.parse().choices[0]
    assert first.finish_reason == "tool_calls" and first.message.content is None
    assert calls_of(first.message) == [("get_weather", PARIS)]
    call = first.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 20
    assert (first.message.model_extra or {})["reasoning_content"] == WEATHER_REASONING
    # The same job through the job API: its result carries the calls.
    result = job_result(stack, raw.headers["x-job-id"])
    assert result["finish_reason"] == "tool_calls" and result["text"] == ""
    assert result["tool_calls"] == [call.model_dump(exclude_none=True)]
    # The client runs the function and sends its answer back, after the assistant's turn as it came
    # (reasoning and calls): the model answers from the result.
    follow_up = [*question, first.message, *results_of(first.message)]
    answer = ask(stack, follow_up).parse().choices[0]
    assert answer.finish_reason == "stop" and answer.message.content == WEATHER_ANSWER
    assert answer.message.tool_calls is None
    # A client that sends back only the calls (no reasoning) gets the same answer.
    bare = {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]}
    again = ask(stack, [*question, bare, *results_of(first.message)]).parse().choices[0]
    assert again.message.content == WEATHER_ANSWER


def test_streamed_agent_loop_reassembles_the_same_calls(stack: Stack) -> None:
    question = [{"role": "user", "content": WEATHER_QUESTION}]
    plain = ask(stack, question).parse().choices[0].message
    job_id, chunks = streamed(stack, question, extra_body={"cache": False})  # generated, not replayed
    calls = reassembled(chunks)
    assert [(c["name"], c["arguments"]) for c in calls] == calls_of(plain)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) >= 3  # id, then pieces
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["tool_calls"]
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    assert reasoning == WEATHER_REASONING
    # The stream's ids are the stored result's.
    stored = job_result(stack, job_id)["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in stored] == [
        (c["id"], c["name"], c["arguments"]) for c in calls
    ]
    # The loop goes on, streamed: the answer comes as content.
    sent_back = [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls
    ]
    assistant = {
        "role": "assistant",
        "content": None,
        "reasoning_content": reasoning,
        "tool_calls": sent_back,
    }
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": run_tool(c["name"], c["arguments"])}
        for c in calls
    ]
    _, answer = streamed(stack, [*question, assistant, *results])
    assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices) == WEATHER_ANSWER
    assert reassembled(answer) == []


def test_a_cached_answer_streams_the_same_calls(stack: Stack) -> None:
    question = [{"role": "user", "content": WEATHER_QUESTION}]
    first_id, first = streamed(stack, question, parallel_tool_calls=False)
    second_id, second = streamed(stack, question, parallel_tool_calls=False)
    assert second_id != first_id and job_result(stack, second_id)["cache"] == "hit"
    assert reassembled(second) == reassembled(first) and len(reassembled(first)) == 1


def test_several_calls_in_one_turn(stack: Stack) -> None:
    question = [{"role": "user", "content": BOTH_QUESTION}]
    message = ask(stack, question).parse().choices[0].message
    assert calls_of(message) == [("get_weather", PARIS), ("get_time", PARIS)]
    assert len({c.id for c in message.tool_calls}) == 2
    answer = ask(stack, [*question, message, *results_of(message)]).parse().choices[0].message
    assert answer.content == BOTH_ANSWER
    # Streamed, the two calls come with their indices.
    _, chunks = streamed(stack, question, extra_body={"cache": False})
    assert [(c["name"], c["arguments"]) for c in reassembled(chunks)] == calls_of(message)


def test_parallel_tool_calls_false_allows_one_call(stack: Stack) -> None:
    choice = (
        ask(stack, [{"role": "user", "content": BOTH_QUESTION}], parallel_tool_calls=False).parse().choices[0]
    )
    assert choice.finish_reason == "tool_calls" and calls_of(choice.message) == [("get_weather", PARIS)]


def test_named_tool_choice_calls_that_function(stack: Stack) -> None:
    question = [{"role": "user", "content": WEATHER_QUESTION}]
    choice = ask(stack, question, tool_choice=NAMED_TIME).parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) == [("get_time", PARIS)]  # not get_weather, which auto picks
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_required_tool_choice_forces_a_call(stack: Stack) -> None:
    question = [{"role": "user", "content": PLAIN_QUESTION}]
    auto = ask(stack, question).parse().choices[0]
    assert (
        auto.finish_reason == "stop" and auto.message.content == PLAIN_ANSWER and not auto.message.tool_calls
    )
    required = ask(stack, question, tool_choice="required").parse().choices[0]
    assert required.finish_reason == "tool_calls"
    assert [name for name, _ in calls_of(required.message)] == ["get_weather"]


def test_tool_choice_none_hides_the_functions(stack: Stack) -> None:
    question = [{"role": "user", "content": WEATHER_QUESTION}]
    offered = ask(stack, question).parse()
    hidden = ask(stack, question, tool_choice="none").parse()
    assert hidden.choices[0].finish_reason != "tool_calls" and not hidden.choices[0].message.tool_calls
    assert hidden.usage is not None and offered.usage is not None
    assert hidden.usage.prompt_tokens < offered.usage.prompt_tokens  # no function namespace rendered


def test_jobs_api_takes_tools_and_returns_calls(stack: Stack) -> None:
    body = {"messages": [{"role": "user", "content": WEATHER_QUESTION}], "tools": TOOLS, "temperature": 0,
            "max_tokens": 100, "tool_choice": NAMED_TIME, "cache": False}  # fmt: skip
    submitted = requests.post(f"{stack.base}/v1/jobs", json=body, headers=stack.headers(), timeout=10)
    assert submitted.status_code == 202, submitted.text
    result = job_result(stack, submitted.json()["id"])
    assert result["finish_reason"] == "tool_calls"
    [call] = result["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "get_time", "arguments": PARIS}


# --- refused before a job exists -----------------------------------------------------------------

WEATHER = TOOLS[0]
USER = [{"role": "user", "content": "hi"}]


def tool(name: str = "f", parameters: Any = None, **function: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, **function}
    if parameters is not None:
        spec["parameters"] = parameters
    return {"type": "function", "function": spec}


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}

MALFORMED = [
    ({"tools": [tool(parameters={"type": "object", "properties": {"a": {"type": "nonsense"}}})]},
     "invalid_tool_schema"),
    ({"tools": [tool(parameters={"type": "string"})]}, "invalid_tool_schema"),
    ({"tools": [tool(parameters={"type": "object", "required": "city"})]}, "invalid_tool_schema"),
    ({"tools": [WEATHER, WEATHER]}, "duplicate_tool_name"),
    ({"tools": [WEATHER], "tool_choice": NAMED_TIME}, "unknown_tool_choice"),
    ({"tool_choice": "required"}, "unknown_tool_choice"),
    ({"tools": [WEATHER], "messages": [*USER, {"role": "tool", "tool_call_id": "call_9", "content": "{}"}]},
     "unknown_tool_call_id"),
    ({"tools": [WEATHER], "messages": [*USER, {"role": "assistant", "tool_calls": [CALL]},
                                        {"role": "tool", "tool_call_id": "call_2", "content": "{}"}]},
     "unknown_tool_call_id"),
    ({"tools": [tool(strict=True)]}, "unsupported_parameter"),
    ({"tools": [tool(name="get weather")]}, "validation_error"),
    ({"tools": [{"type": "code_interpreter"}]}, "validation_error"),
    ({"tool_choice": "sometimes"}, "validation_error"),
    ({"messages": [*USER, {"role": "tool", "content": "{}"}]}, "validation_error"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}]}, "validation_error"),
    ({"messages": [{"role": "user", "content": None}]}, "validation_error"),
    ({"parallel_tool_calls": "yes"}, "validation_error"),
]  # fmt: skip
"""Bodies (over a minimal chat) refused with a 422 and the code each gets."""


@pytest.fixture
def app_of(redis: Redis, settings):  # type: ignore[no-untyped-def]
    """A test client of the app serving `model` (no workers: nothing here gets that far)."""
    return lambda model: create_app(settings(model=model), redis).test_client()


@pytest.mark.parametrize(("fields", "code"), MALFORMED)
def test_malformed_tool_requests_are_refused_with_a_code(
    app_of, redis: Redis, fields: dict, code: str
) -> None:  # type: ignore[no-untyped-def]
    client = app_of(MODEL)
    for path in (CHAT, "/v1/jobs"):
        response = client.post(path, json={"messages": USER, **fields})
        assert response.status_code == 422, response.get_data(as_text=True)
        assert response.is_json and response.get_json()["error"]["code"] == code
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0


def test_a_model_without_tool_support_refuses_tools_naming_itself(app_of) -> None:  # type: ignore[no-untyped-def]
    client = app_of("smollm2-135m")  # its chat template takes no tools
    answered = [*USER, {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{}"}]  # fmt: skip
    for body in ({"messages": USER, "tools": TOOLS}, {"messages": answered}):
        for path in (CHAT, "/v1/jobs"):
            error = client.post(path, json=body).get_json()["error"]
            assert error["code"] == "tools_unsupported" and "`smollm2-135m`" in error["message"]
    # What changes nothing is still accepted (SDKs send it): no tools, tool_choice none.
    response = client.post(CHAT, json={"messages": USER, "tools": [], "tool_choice": "none", "stream": True},
                           buffered=False)  # fmt: skip
    response.close()
    assert response.status_code == 200  # a job was created (closing the stream cancelled it)
