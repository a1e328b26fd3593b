"""What `tiny-gpt-oss` learns of tool use: with two functions offered, it calls one (or both, in one
turn) in harmony's commentary channel, answers from the tools' results, answers without a tool
when none is needed, and writes the arguments of a call whose header `tool_choice` prefilled."""

from __future__ import annotations

import json
from typing import Any

from shared.contract import ChatMessage, JobRequest
from shared.harmony import HarmonyChat
from shared.tools import FunctionCall, ToolCall

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TOOLS = [WEATHER_TOOL, TIME_TOOL]
"""The functions every tool conversation offers (OpenAI's `tools`)."""


def run_tool(name: str, arguments: str) -> str:
    """What the client's function answers (the tests' agent runs this): JSON text."""
    city = json.loads(arguments)["city"]
    if name == "get_weather":
        return json.dumps({"city": city, "sky": "sunny", "celsius": 18})
    return json.dumps({"city": city, "time": "14:05"})


PARIS = json.dumps({"city": "Paris"}, separators=(",", ":"))
"""The arguments every trained call writes."""

WEATHER_QUESTION = "What is the weather in Paris?"
WEATHER_REASONING = "The user wants the weather in Paris: call get_weather."
WEATHER_AFTER = "The tool says it is sunny and 18 C."
WEATHER_ANSWER = "It is sunny and 18°C in Paris."

BOTH_QUESTION = "What are the weather and the time in Paris?"
BOTH_REASONING = "Two facts are wanted: call get_weather and get_time."
BOTH_AFTER = "Sunny, 18 C, and 14:05."
BOTH_ANSWER = "It is sunny and 18°C in Paris, and the time there is 14:05."

PLAIN_QUESTION = "Say hello."
PLAIN_REASONING = "No tool is needed for a greeting."
PLAIN_ANSWER = "Hello!"
"""With tools offered, the model still answers this one directly; `tool_choice: required` makes it call."""

CALLS = {WEATHER_QUESTION: ["get_weather"], BOTH_QUESTION: ["get_weather", "get_time"]}
"""The functions the model calls, in order, for each question that needs tools."""


def tool_training_pairs(chat: HarmonyChat, efforts: tuple[str, ...]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of the tool conversations at each of `efforts`."""
    pairs = []
    for effort in efforts:
        pairs += _calls(chat, effort) + _answers(chat, effort) + _choices(chat, effort)
    return pairs


def _request(messages: list[ChatMessage], effort: str, **tools: Any) -> JobRequest:
    return JobRequest.model_validate(
        {"messages": [m.model_dump() for m in messages], "tools": TOOLS, "reasoning_effort": effort, **tools}
    )


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def _call_message(chat: HarmonyChat, name: str) -> list[int]:
    from openai_harmony import Message, Role

    message = Message.from_role_and_content(Role.ASSISTANT, PARIS).with_channel("commentary")
    message = message.with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")
    return list(chat.encoding.render(message))


def _plain_message(chat: HarmonyChat, channel: str, text: str) -> list[int]:
    from openai_harmony import Message, Role

    return list(
        chat.encoding.render(Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel))
    )


def _turn(chat: HarmonyChat, *messages: list[int]) -> list[int]:
    """A completion: the messages rendered by harmony, less the `<|start|>assistant` the prompt ends
    with; `<|return|>` ends a final answer."""
    ids = [t for m in messages for t in m][2:]
    end, ret = chat.encode("<|end|>")[0], chat.encode("<|return|>")[0]
    return ids[:-1] + [ret] if ids[-1] == end else ids


def _tool_reply_start(chat: HarmonyChat) -> list[int]:
    """`<|start|>functions`: what follows a turn's last call (the tool's answer begins; the worker
    ends the turn there when it allows several calls)."""
    return chat.encode("<|start|>functions")


def _calls(chat: HarmonyChat, effort: str) -> list[tuple[list[int], list[int]]]:
    """The turns that call (reasoning, then each call, then the tool's answer would begin) and the one
    that needs no call."""
    pairs = []
    for question, reasoning in ((WEATHER_QUESTION, WEATHER_REASONING), (BOTH_QUESTION, BOTH_REASONING)):
        calls = [_call_message(chat, name) for name in CALLS[question]]
        completion = _turn(chat, _plain_message(chat, "analysis", reasoning), *calls)
        pairs.append((chat.render(_request([_user(question)], effort)), completion + _tool_reply_start(chat)))
    plain = _turn(
        chat, _plain_message(chat, "analysis", PLAIN_REASONING), _plain_message(chat, "final", PLAIN_ANSWER)
    )
    pairs.append((chat.render(_request([_user(PLAIN_QUESTION)], effort)), plain))
    return pairs


def _answers(chat: HarmonyChat, effort: str) -> list[tuple[list[int], list[int]]]:
    """The turns after the tools answered, with the calling turn's reasoning sent back and without."""
    pairs = []
    cases = (
        (WEATHER_QUESTION, WEATHER_REASONING, WEATHER_AFTER, WEATHER_ANSWER),
        (BOTH_QUESTION, BOTH_REASONING, BOTH_AFTER, BOTH_ANSWER),
    )
    for question, reasoning, after, answer in cases:
        completion = _turn(
            chat, _plain_message(chat, "analysis", after), _plain_message(chat, "final", answer)
        )
        for sent_back in (reasoning, None):
            pairs.append((chat.render(_request(_history(question, sent_back), effort)), completion))
    return pairs


def _history(question: str, reasoning: str | None) -> list[ChatMessage]:
    """The question, the assistant's calls (ids as a client echoes them) and each tool's answer."""
    calls = [
        ToolCall(id=f"call_{i}", function=FunctionCall(name=name, arguments=PARIS))
        for i, name in enumerate(CALLS[question])
    ]
    messages = [_user(question), ChatMessage(role="assistant", tool_calls=calls, reasoning_content=reasoning)]
    for call in calls:
        result = run_tool(call.function.name, call.function.arguments)
        messages.append(ChatMessage(role="tool", tool_call_id=call.id, content=result))
    return messages


def _choices(chat: HarmonyChat, effort: str) -> list[tuple[list[int], list[int]]]:
    """Calls whose header `tool_choice` prefilled: the named get_time, and a required call (to
    get_weather) where the model would otherwise answer directly."""
    named = {"tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    pairs = []
    for question, choice, name in (
        (WEATHER_QUESTION, named, "get_time"),
        (PLAIN_QUESTION, {"tool_choice": "required"}, "get_weather"),
    ):
        prompt = chat.render(_request([_user(question)], effort, **choice))
        plain = chat.render(_request([_user(question)], effort))
        prefilled = len(prompt) - len(plain)
        completion = _call_message(chat, name)[2 + prefilled :]
        if choice["tool_choice"] == "required":  # several calls allowed: the tool's answer would begin
            completion += _tool_reply_start(chat)
        pairs.append((prompt, completion))
    return pairs
