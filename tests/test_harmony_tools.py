"""Tool calls in harmony, without a model: functions rendered into the developer message, earlier calls
and tool results rendered back, the prefilled header of a named or required call, the stop tokens,
the parser picking calls out of generated tokens, and OpenAI's stream chunks made of them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.contract import JobRequest
from shared.harmony import HarmonyChat
from shared.openai.tool_calls import CallDeltas
from shared.response_cache import channel_texts
from shared.settings import Settings
from shared.tools import calls_of, parse_call_channel
from workers.tiny_tools import PARIS, TOOLS, run_tool

CALL, RETURN = 200012, 200002


@pytest.fixture(scope="module")
def chat() -> HarmonyChat:
    return HarmonyChat(Settings().vocab_dir())


def request(messages: list[dict[str, Any]], **fields: Any) -> JobRequest:
    return JobRequest.model_validate({"messages": messages, "tools": TOOLS, **fields})


def feed(chat: HarmonyChat, text: str, req: JobRequest | None = None) -> tuple[list[tuple[str, str]], bool]:
    """The (channel, text) deltas a parser makes of `text`'s tokens, and whether it ended the turn."""
    parser = chat.parser(req)
    deltas = [d for d in (parser.feed(t) for t in chat.encode(text)) if d is not None]
    return [(d.channel, d.text) for d in deltas], parser.over


def call_text(name: str, arguments: str = PARIS) -> str:
    header = f"<|start|>assistant to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>"
    return f"{header}{arguments}<|call|>"


USER = [{"role": "user", "content": "Hi"}]
CALLING = request(USER)
"""A request that offers the tools (and allows several calls)."""


def test_functions_go_into_the_developer_message(chat: HarmonyChat) -> None:
    text = chat.decode(chat.render(request([{"role": "user", "content": "Hi"}])))
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {" in text
    assert "// Current weather in a city.\ntype get_weather = (_: {\ncity: string,\n}) => any;" in text
    # tool_choice none: the model is not shown what it may not call.
    hidden = chat.decode(chat.render(request([{"role": "user", "content": "Hi"}], tool_choice="none")))
    assert "namespace functions" not in hidden and "commentary channel" not in hidden


def test_earlier_calls_and_tool_results_are_rendered_back(chat: HarmonyChat) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}
    result = run_tool("get_weather", PARIS)
    turns = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "reasoning_content": "Call it.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]
    text = chat.decode(chat.render(request(turns)))
    assert text.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Call it.<|end|>"  # kept: the turn goes on
        + call_text("get_weather")
        + f"<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{result}<|end|>"
        + "<|start|>assistant"
    )
    # Once the turn ended in an answer, harmony drops its reasoning.
    later = [*turns, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    text = chat.decode(chat.render(request(later)))
    assert "Call it." not in text and call_text("get_weather") in text


def test_named_and_required_choices_prefill_the_header(chat: HarmonyChat) -> None:
    user = [{"role": "user", "content": "Hi"}]
    plain = chat.render(request(user))
    named = chat.render(request(user, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    required = chat.render(request(user, tool_choice="required"))
    assert named[: len(plain)] == plain and required[: len(plain)] == plain
    assert (
        chat.decode(named[len(plain) :])
        == " to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>"
    )
    assert chat.decode(required[len(plain) :]) == " to=functions"  # the model names the function


def test_several_calls_drop_call_from_the_stop_tokens(chat: HarmonyChat) -> None:
    user = [{"role": "user", "content": "Hi"}]
    assert sorted(chat.stop_token_ids(request(user))) == [RETURN]
    assert sorted(chat.stop_token_ids(request(user, parallel_tool_calls=False))) == [RETURN, CALL]
    named = request(user, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert sorted(chat.stop_token_ids(named)) == [RETURN, CALL]  # one named call, then the turn ends
    assert sorted(chat.stop_token_ids(JobRequest(prompt="hi"))) == [RETURN, CALL]


def test_parser_gives_each_call_its_channel(chat: HarmonyChat) -> None:
    text = "<|channel|>analysis<|message|>Both.<|end|>" + call_text("get_weather") + call_text("get_time", "")
    deltas, over = feed(chat, text, CALLING)
    assert _joined(deltas)[0] == ("analysis", "Both.") and not over
    calls = calls_of(_joined(deltas))
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", PARIS),
        ("get_time", "{}"),  # a call without arguments gets an empty object
    ]
    first, second = (parse_call_channel(ch) for ch, _ in _joined(deltas)[1:])
    assert first is not None and second is not None
    assert (first[0], second[0]) == (0, 1) and first[1] != second[1] and first[1].startswith("call_")


def test_after_a_call_anything_but_another_call_ends_the_turn(chat: HarmonyChat) -> None:
    head = call_text("get_weather")[len("<|start|>assistant") :]
    _, over = feed(chat, head + "<|start|>functions.get_weather to=assistant", CALLING)
    assert over  # the model began the tool's answer: only the tool writes that
    deltas, over = feed(chat, head + "<|start|>assistant<|channel|>final<|message|>Sunny.<|return|>", CALLING)
    assert over and ("final", "Sunny.") not in deltas  # no answer before the result came
    _, over = feed(chat, head + call_text("get_time"), CALLING)
    assert not over


def test_calls_are_dropped_when_tools_are_not_offered(chat: HarmonyChat) -> None:
    head = call_text("get_weather")[len("<|start|>assistant") :]
    deltas, _ = feed(chat, head, request(USER, tool_choice="none"))
    assert deltas == []


def test_stream_chunks_open_each_call_with_its_id_and_name() -> None:
    calls = CallDeltas()
    opening = calls.deltas("tool_call:0:call_abc:get_weather", '{"city"')
    assert opening is not None
    assert [[d.model_dump() for d in chunk] for chunk in opening] == [
        [
            {
                "index": 0,
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
        [{"index": 0, "function": {"arguments": '{"city"'}}],
    ]
    more = calls.deltas("tool_call:0:call_abc:get_weather", ':"Paris"}')
    assert more is not None and [[d.model_dump() for d in c] for c in more] == [
        [{"index": 0, "function": {"arguments": ':"Paris"}'}}]
    ]
    assert calls.deltas("final", "Hi") is None


def test_a_cached_result_streams_its_calls() -> None:
    call = {"id": "call_x", "type": "function", "function": {"name": "get_time", "arguments": PARIS}}
    result = {"text": "", "reasoning": "Time.", "tool_calls": [call]}
    assert channel_texts(result) == [("analysis", "Time."), ("tool_call:0:call_x:get_time", PARIS)]
    assert json.loads(channel_texts(result)[1][1]) == {"city": "Paris"}


def _joined(deltas: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive deltas of one channel joined (as OutputText holds them)."""
    joined: list[tuple[str, str]] = []
    for channel, text in deltas:
        if joined and joined[-1][0] == channel:
            joined[-1] = (channel, joined[-1][1] + text)
        else:
            joined.append((channel, text))
    return joined
