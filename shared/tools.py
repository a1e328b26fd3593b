"""Tool calling's contract: the function tools a request offers, the tool choice, the calls a model
makes, how a call travels in a job's token events, and the checks that refuse a malformed request
with a stable code. No torch: the API checks what the workers run."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import ValidationFailed

FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""What a function's name may hold (OpenAI's rule); it keeps harmony's recipient `functions.<name>`
and a call's event channel unambiguous."""

MAX_TOOLS = 128
"""Tools one request may offer (OpenAI's limit)."""

MAX_CALL_ID_CHARS = 128
"""Characters of a tool call's id."""

MAX_DESCRIPTION_CHARS = 16_384
"""Characters of one function's description."""

MAX_ARGUMENTS_CHARS = 400_000
"""Characters of one call's arguments (the body-size limit usually bites first)."""

FUNCTIONS = "functions"
"""Harmony's namespace of the client's functions: a call's recipient is `functions.<name>`."""

CALL_CHANNEL = "tool_call"
"""A call's arguments stream as token events whose channel is `tool_call:<index>:<id>:<name>`."""


class FunctionDefinition(BaseModel):
    """A function the model may call: its name, what it does, its parameters as a JSON Schema."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON Schema of an object; unset: the function takes no arguments"
    )
    strict: bool | None = Field(
        default=None, strict=True, description="Only false or null: arguments are not decoded under a grammar"
    )


class Tool(BaseModel):
    """One tool of a request: only functions."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    """`tool_choice` naming the one function the model must call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
"""`none`: answer without calling; `auto` (with tools, the default): the model decides; `required`:
call at least one function; a named function: call that one."""


class FunctionCall(BaseModel):
    """The function a call names and its arguments, as the JSON text the model wrote."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: str = Field(max_length=MAX_ARGUMENTS_CHARS)


class ToolCall(BaseModel):
    """One call the model made (in a result) or made earlier (in an assistant message sent back)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_CALL_ID_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolError(ValidationFailed):
    """A request whose tools, tool choice or tool messages do not fit together."""

    code = "invalid_tools"


class InvalidToolSchema(ToolError):
    code = "invalid_tool_schema"


class DuplicateToolName(ToolError):
    code = "duplicate_tool_name"


class UnknownToolChoice(ToolError):
    code = "unknown_tool_choice"


class UnknownToolCallId(ToolError):
    code = "unknown_tool_call_id"


class ToolsUnsupported(ToolError):
    code = "tools_unsupported"


def new_call_id() -> str:
    """A fresh call id, as OpenAI's look (`call_` and 24 random characters)."""
    return f"call_{secrets.token_hex(12)}"


def call_channel(index: int, call_id: str, name: str) -> str:
    """The token events' channel of the `index`th call of a generation."""
    return f"{CALL_CHANNEL}:{index}:{call_id}:{name}"


def parse_call_channel(channel: str) -> tuple[int, str, str] | None:
    """(index, id, name) of a call's channel; None for any other channel."""
    kind, _, rest = channel.partition(":")
    if kind != CALL_CHANNEL:
        return None
    index, call_id, name = rest.split(":", 2)
    return int(index), call_id, name


def calls_of(channels: Iterable[tuple[str, str]]) -> list[ToolCall]:
    """The calls among (channel, text) pairs, in order (the text of a call's channel is its arguments)."""
    calls = []
    for channel, text in channels:
        parsed = parse_call_channel(channel)
        if parsed is not None:
            _, call_id, name = parsed
            calls.append(ToolCall(id=call_id, function=FunctionCall(name=name, arguments=text)))
    return calls
