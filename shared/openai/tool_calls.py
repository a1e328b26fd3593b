"""Tool calls in OpenAI's wire format: an answer's `message.tool_calls`, and the `delta.tool_calls`
chunks of a stream (a call's index, id and name first, then its arguments in fragments), made from
the job's token events on each call's channel (`shared.tools.call_channel`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from shared.tools import MAX_TOOLS, Tool, ToolChoice, parse_call_channel

FinishReason = Literal["stop", "length", "tool_calls"]
"""Why a chat answer ended: `tool_calls` when it ended by calling functions."""


class ChatToolFields(BaseModel):
    """What a chat completion request may offer: functions, the choice among them, parallel calls."""

    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS, description="Functions to call")
    tool_choice: ToolChoice | None = Field(default=None, description="none, auto, required, or a function")
    parallel_tool_calls: bool | None = Field(default=None, strict=True, description="false: one call a turn")

    def tool_fields(self) -> dict[str, Any]:
        """The job fields these ask for (none without tools when they change nothing, so the job is
        the same as one that never sent them)."""
        if not self.tools and self.tool_choice in (None, "none", "auto"):
            return {}
        return {"tools": self.tools or None, "tool_choice": self.tool_choice,
                "parallel_tool_calls": self.parallel_tool_calls}  # fmt: skip


class DeltaFunction(BaseModel):
    """A piece of a streamed call: its name (first chunk only) and a fragment of its arguments."""

    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    """One entry of `delta.tool_calls`: the call's `index` in the answer; `id` and `type` only in its
    first chunk, as OpenAI streams them."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class CallDeltas:
    """Turns token events into `delta.tool_calls` entries, remembering which calls were opened."""

    def __init__(self) -> None:
        self._opened: set[int] = set()

    def deltas(self, channel: str, text: str) -> list[list[DeltaToolCall]] | None:
        """The `delta.tool_calls` of each chunk for a token event (a new call opens with its id and
        name, its arguments follow in the next chunk); None when `channel` is no call's."""
        parsed = parse_call_channel(channel)
        if parsed is None:
            return None
        index, call_id, name = parsed
        chunks = []
        if index not in self._opened:
            self._opened.add(index)
            opening = DeltaFunction(name=name, arguments="")
            chunks.append([DeltaToolCall(index=index, id=call_id, type="function", function=opening)])
        if text:
            chunks.append([DeltaToolCall(index=index, function=DeltaFunction(arguments=text))])
        return chunks


def text_finish(reason: FinishReason) -> Literal["stop", "length"]:
    """A text completion's finish reason (its endpoint offers no tools: a call still stopped it)."""
    return "length" if reason == "length" else "stop"
