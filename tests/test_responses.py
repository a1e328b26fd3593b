"""OpenAI's Responses API (issue #23): the pure parts (the request's mapping onto the job contract, the
stream translator: deterministic and resumable, every event parsed by the official SDK's types),
then, with the official `openai` client against the real processes on tiny-gpt-oss: background
create and poll, a background stream left mid-way and resumed with `starting_after`, cancel while
queued and while running, a two-turn conversation on cached tokens, function calls and their
outputs, structured output, another tenant's id, and parameters this server does not implement."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
import requests
from openai._models import validate_type
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent
from redis import Redis

from api.responses_events import ResponseEvents, translate
from api.responses_types import ResponseHead, ResponseRequest, ResponseRequestError
from shared.apikeys import create_key
from shared.errors import UnsupportedParameter
from shared.jobstore.events import JobEvent
from shared.jobstore.hub import StreamHub, Subscription
from shared.json_body import parse_body
from shared.tools import call_channel
from tests.conftest import Stack, start_stack, wait_for
from workers.tiny_model import CONVERSATIONS
from workers.tiny_tools import TOOLS, WEATHER_ANSWER, WEATHER_QUESTION, run_tool

MODEL = "tiny-gpt-oss"
FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
"""The tiny model's two functions in Responses' flat shape."""

LONG = "Write the numbers from one to ten thousand in words, one per line, and never stop."
"""A prompt tiny-gpt-oss was never trained on: sampled at temperature 2 it runs for tens of seconds."""

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "celsius": {"type": "integer", "minimum": -50, "maximum": 60},
        "sky": {"enum": ["sunny", "cloudy", "rainy"]},
    },
    "required": ["city", "celsius", "sky"],
    "additionalProperties": False,
}
"""The structured output's schema."""


# --- pure: the request's mapping and the stream translator ------------------------------------------


def head(background: bool = True) -> ResponseHead:
    echo = ResponseRequest.model_validate(
        {"input": "hi", "background": background, "tools": FLAT_TOOLS}
    ).echo()
    return ResponseHead(id="job1", created_at=1_700_000_000, model=MODEL, echo=echo)


def result(**fields: Any) -> dict[str, Any]:
    usage = {
        "prompt_tokens": 20,
        "completion_tokens": 9,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 12},
    }
    return {
        "text": "",
        "reasoning": "Think.",
        "finish_reason": "stop",
        "usage": usage,
        "model": MODEL,
        "worker": "w",
        "queue": "gpu-single",
        "timings": {"finished": 1_700_000_001.0},
        **fields,
    }


def job_events(*ending: JobEvent) -> list[JobEvent]:
    """A run that reasons, then calls a function, then (given) ends."""
    call = call_channel(0, "call_1", "get_weather")
    return [
        JobEvent("start", {}),
        JobEvent("token", {"channel": "analysis", "text": "Thi"}),
        JobEvent("token", {"channel": "analysis", "text": "nk."}),
        JobEvent("token", {"channel": call, "text": ""}),
        JobEvent("token", {"channel": call, "text": '{"city":'}),
        JobEvent("token", {"channel": call, "text": '"Paris"}'}),
        *ending,
    ]


def stream_of(events: list[JobEvent], after: int = -1, background: bool = True) -> list[dict[str, Any]]:
    return [e for e in translate(ResponseEvents(head(background), len), events, after) if e is not None]


def test_translator_is_deterministic_resumable_and_parsed_by_the_sdk() -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    done = JobEvent("done", result(tool_calls=calls, finish_reason="tool_calls"))
    stream = stream_of(job_events(done))
    assert stream == stream_of(job_events(done))  # the same job events, the same stream events
    assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
    for event in stream:
        validate_type(type_=ResponseStreamEvent, value=event)  # type: ignore[arg-type]
    types = [e["type"] for e in stream]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert (
        stream[0]["response"]["status"] == "queued"
        and stream_of([], background=False)[0]["response"]["status"] == "in_progress"
    )
    assert "".join(e["delta"] for e in stream if e["type"] == "response.reasoning_text.delta") == "Think."
    arguments = "".join(e["delta"] for e in stream if e["type"] == "response.function_call_arguments.delta")
    assert arguments == '{"city":"Paris"}' and types[-1] == "response.completed"
    final = validate_type(type_=SdkResponse, value=stream[-1]["response"])
    assert [i.type for i in final.output] == ["reasoning", "function_call"]
    assert final.output[1].call_id == "call_1" and final.usage is not None  # type: ignore[union-attr]
    assert final.usage.input_tokens_details.cached_tokens == 12
    assert final.usage.output_tokens_details.reasoning_tokens == len("Think.")  # the counter given
    # Resumed after any event: exactly the rest, whatever block the job's events come in.
    for after in range(len(stream)):
        assert stream_of(job_events(done), after) == stream[after + 1 :]


def test_translator_ends_incomplete_failed_or_cancelled() -> None:
    cut = stream_of(
        [
            JobEvent("start", {}),
            JobEvent("token", {"channel": "final", "text": "Hel"}),
            JobEvent("done", result(text="Hel", reasoning=None, finish_reason="length")),
        ]
    )
    assert cut[-1]["type"] == "response.incomplete"
    assert cut[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut[-2]["item"]["status"] == "incomplete" and cut[-2]["item"]["content"][0]["text"] == "Hel"
    # Cancelled while queued: the ending read from the job, no run at all.
    cancelled = stream_of([JobEvent("error", {"code": "job_cancelled", "message": "Cancelled."})])
    assert [e["type"] for e in cancelled] == ["response.created", "response.failed"]
    assert cancelled[-1]["response"]["status"] == "cancelled"
    failed = stream_of(job_events(JobEvent("error", {"code": "job_failed", "message": "Boom."})))
    assert (
        failed[-1]["response"]["status"] == "failed"
        and failed[-1]["response"]["error"]["type"] == "job_failed"
    )
    assert failed[-2]["type"] == "response.output_item.done" and failed[-2]["item"]["status"] == "incomplete"
    for event in cut + cancelled + failed:
        validate_type(type_=ResponseStreamEvent, value=event)  # type: ignore[arg-type]


def test_input_items_tools_and_format_map_onto_the_job_contract() -> None:
    body = {
        "input": [
            {"role": "user", "content": WEATHER_QUESTION},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "R"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And?"}]},
        ],
        "instructions": "Be brief.",
        "tools": FLAT_TOOLS,
        "tool_choice": {"type": "function", "name": "get_time"},
        "text": {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER}},
        "reasoning": {"effort": "minimal"},
        "max_output_tokens": 50,
    }
    params = parse_body(body, ResponseRequest)
    job = params.submission(params.new_messages(), "s1")
    assert [m.role for m in job.messages or []] == ["developer", "user", "assistant", "tool", "user"]
    calls = job.messages[2].tool_calls if job.messages else None
    assert (
        [c.id for c in calls or []] == ["c1", "c2"]
        and job.messages
        and job.messages[2].reasoning_content == "R"
    )
    assert job.tools and job.tools[0].function.name == "get_weather" and job.max_tokens == 50
    assert job.response_format is not None and job.response_format.json_schema is not None
    assert job.reasoning_effort == "low" and job.session_id == "s1"
    assert job.tool_choice is not None and not isinstance(job.tool_choice, str)
    # Not implemented: refused by name, never ignored.
    for extra, name in [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"conversation": "c"}, "conversation"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"reasoning": {"summary": "auto"}}, "summary"),
    ]:
        with pytest.raises(UnsupportedParameter) as refused:
            parse_body({"input": "hi", **extra}, ResponseRequest)
        assert name in refused.value.message
    with pytest.raises(ResponseRequestError):
        parse_body({"input": "hi", "background": True, "store": False}, ResponseRequest)


def test_the_hub_never_hands_a_late_follower_entries_past_a_gap(redis: Redis) -> None:
    # A replay (starting_after) that subscribes while another follower of the same job is read from a
    # later entry must not be handed that round's entries: it would skip the ones in between.
    hub = StreamHub(redis)
    early, late = Subscription("k", "5-0"), Subscription("k", "0-0")
    hub._subscriptions |= {early, late}
    hub._hand_over([(b"k", [(b"6-0", {}), (b"7-0", {})])], {"k": "5-0"})
    assert [entry_id for entry_id, _ in early.take(0)] == ["6-0", "7-0"]
    assert late.take(0) == [] and late.cursor == "0-0"  # read from its own cursor next round


# --- the real processes, through the official client --------------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # One batch slot: a second job waits in the worker's queue while a long one runs.
    running, procs = start_stack(
        redis_url,
        prepared_models.cache_dir,
        tmp_path_factory.mktemp("responses"),
        MODEL,
        GPTOSS_MAX_BATCH_SIZE=1,
    )
    try:
        yield running
    finally:
        procs.stop_all()


def job(stack: Stack, job_id: str) -> dict[str, Any]:
    return requests.get(f"{stack.base}/v1/jobs/{job_id}", headers=stack.headers(), timeout=5).json()


def test_background_response_is_polled_to_completion(stack: Stack) -> None:
    client = stack.client()
    question, analysis, final = CONVERSATIONS[0]
    created = client.responses.create(
        model=MODEL,
        input=question,
        background=True,
        temperature=0,
        max_output_tokens=80,
        reasoning={"effort": "low"},
        metadata={"k": "v"},
    )
    assert created.background and created.status in ("queued", "in_progress", "completed")
    wait_for(lambda: client.responses.retrieve(created.id).status == "completed", 90, "the response")
    done = client.responses.retrieve(created.id)
    assert done.output_text == final and done.metadata == {"k": "v"} and done.reasoning is not None
    reasoning = [item for item in done.output if item.type == "reasoning"]
    assert reasoning[0].content is not None and reasoning[0].content[0].text == analysis
    assert (
        done.usage is not None
        and 0 < done.usage.output_tokens_details.reasoning_tokens < done.usage.output_tokens
    )
    assert job(stack, created.id)["status"] == "finished"  # one job, under /v1/jobs as well
    items = client.responses.input_items.list(created.id)
    assert [i.type for i in items.data] == ["message"]


def test_a_background_stream_left_mid_way_resumes_without_loss_or_duplicates(stack: Stack) -> None:
    client = stack.client()
    question, analysis, final = CONVERSATIONS[4]
    stream = client.responses.create(
        model=MODEL, input=question, background=True, stream=True, temperature=0, max_output_tokens=80
    )
    first = []
    for event in stream:
        first.append(event)
        if event.type == "response.reasoning_text.delta":
            break  # the client goes away mid-way
    stream.close()
    response_id = first[0].response.id  # type: ignore[union-attr]
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=first[-1].sequence_number))
    events = first + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == final
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == analysis
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final
    # The whole stream again is the same events; the job ran on (background: leaving cancels nothing).
    again = list(client.responses.retrieve(response_id, stream=True))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events]
    assert client.responses.retrieve(response_id).status == "completed"


def test_cancel_while_queued_and_while_running(stack: Stack) -> None:
    client = stack.client()
    running = client.responses.create(
        model=MODEL, input=LONG, background=True, temperature=2.0, max_output_tokens=4000
    )
    wait_for(lambda: job(stack, running.id)["status"] == "started", 90, "the long response to run")
    queued = client.responses.create(model=MODEL, input="hi", background=True, max_output_tokens=8)
    wait_for(lambda: job(stack, queued.id)["status"] == "scheduled", 30, "the second response to wait")
    assert client.responses.retrieve(queued.id).status == "queued"
    assert client.responses.cancel(queued.id).status == "cancelled"
    stopped = client.responses.cancel(running.id)
    assert stopped.status == "cancelled" and job(stack, running.id)["error"]["code"] == "job_cancelled"
    assert (
        client.responses.retrieve(queued.id).status == "cancelled"
        and job(stack, queued.id)["status"] == "cancelled"
    )
    # Only a background response can be cancelled.
    plain = client.responses.create(model=MODEL, input="hi", max_output_tokens=8, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)
    # A client that leaves a stream that is not background cancels its job (as chat completions do).
    stream = client.responses.create(
        model=MODEL, input=LONG, stream=True, temperature=2.0, max_output_tokens=4000
    )
    left = next(e for e in stream if e.type == "response.in_progress").response.id  # type: ignore[union-attr]
    stream.close()
    wait_for(
        lambda: job(stack, left)["status"] == "cancelled", 60, "the abandoned stream's job to be cancelled"
    )


def test_previous_response_id_continues_the_conversation_on_cached_tokens(stack: Stack) -> None:
    client = stack.client()
    first = client.responses.create(
        model=MODEL, input=CONVERSATIONS[0][0], temperature=0, max_output_tokens=80
    )
    assert first.output_text == CONVERSATIONS[0][2] and first.usage is not None
    second = client.responses.create(
        model=MODEL,
        input=CONVERSATIONS[1][0],
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=80,
    )
    assert second.previous_response_id == first.id and second.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    # The model saw turn 1 (its question and answer are in turn 2's prompt), served from turn 1's KV.
    assert second.usage.input_tokens > first.usage.input_tokens + 5
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 2


def test_a_function_call_then_its_output_gets_the_answer(stack: Stack) -> None:
    client = stack.client()
    weather: Any = {"type": "function", "name": "get_weather"}
    first = client.responses.create(
        model=MODEL,
        input=WEATHER_QUESTION,
        tools=FLAT_TOOLS,
        tool_choice=weather,
        temperature=0,
        max_output_tokens=100,
    )  # type: ignore[arg-type]
    assert first.output[-1].type == "function_call" and first.output_text == ""
    assert "message" not in [item.type for item in first.output] and first.tool_choice.model_dump() == weather  # type: ignore[union-attr]
    call = first.output[-1]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"}
    # The client runs the function; its output continues the response (which holds the call).
    output: Any = {
        "type": "function_call_output",
        "call_id": call.call_id,
        "output": run_tool(call.name, call.arguments),
    }
    answer = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[output],
        tools=FLAT_TOOLS,
        temperature=0,
        max_output_tokens=100,
    )  # type: ignore[arg-type]
    assert answer.output_text == WEATHER_ANSWER and answer.usage is not None
    assert answer.usage.input_tokens_details.cached_tokens > 0


def test_text_format_json_schema_gives_valid_json(stack: Stack) -> None:
    response = stack.client().responses.create(
        model=MODEL,
        input=CONVERSATIONS[0][0],
        temperature=0,
        max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}},
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), WEATHER)


def test_another_tenants_response_is_not_found_and_unimplemented_parameters_are_named(stack: Stack) -> None:
    mine = stack.client().responses.create(model=MODEL, input="hi", background=True, max_output_tokens=8)
    other_key, _ = create_key(stack.redis, "other")
    other = openai.OpenAI(base_url=f"{stack.base}/v1", api_key=other_key, max_retries=0)
    for call in (
        lambda: other.responses.retrieve(mine.id),
        lambda: other.responses.cancel(mine.id),
        lambda: other.responses.input_items.list(mine.id),
        lambda: other.responses.delete(mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="hi", previous_response_id=mine.id)
    client = stack.client()
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert refused.value.code == "unsupported_parameter" and "tools[0].type" in refused.value.message
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="hi", background=True, store=False)
    unstored = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=8)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(mine.id)
