"""The Responses API's input side: input items (messages, function calls, their outputs, reasoning),
function tools in Responses' flat shape, `tool_choice` and `text.format`, each validated as OpenAI
defines it and mapped onto the job contract (messages, tools, response_format). What this server
does not implement is refused with `unsupported_parameter` naming it, never ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from shared.contract import MAX_MESSAGES, MAX_TEXT_CHARS, ChatMessage, JsonSchemaFormat, ResponseFormat
from shared.errors import ValidationFailed
from shared.json_body import UNSUPPORTED
from shared.openai.params import refuse_unsupported
from shared.tools import (
    FUNCTION_NAME_PATTERN,
    MAX_ARGUMENTS_CHARS,
    MAX_CALL_ID_CHARS,
    MAX_DESCRIPTION_CHARS,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoice,
)

ITEM_ID = Field(default=None, max_length=128, description="The item's id, as an earlier answer gave it")
ITEM_STATUS = Field(default=None, description="As an earlier answer gave it")


class InputText(BaseModel):
    """A text part of a message: `input_text` (user, system, developer) or `output_text` (an
    assistant's earlier answer, as the SDK echoes it with its annotations and logprobs)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)
    annotations: list[Any] | None = Field(default=None, max_length=0)
    logprobs: list[Any] | None = None


class MessageItem(BaseModel):
    """A message: its content a string or text parts."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText] = Field(max_length=MAX_TEXT_CHARS)
    id: str | None = ITEM_ID
    status: Literal["in_progress", "completed", "incomplete"] | None = ITEM_STATUS
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self) -> str:
        """The content's text, its parts joined."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made earlier, sent back with its output."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=MAX_CALL_ID_CHARS)
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: str = Field(max_length=MAX_ARGUMENTS_CHARS)
    id: str | None = ITEM_ID
    status: Literal["in_progress", "completed", "incomplete"] | None = ITEM_STATUS


class FunctionOutputItem(BaseModel):
    """What the client's function returned for call `call_id`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=MAX_CALL_ID_CHARS)
    output: str | list[InputText] = Field(max_length=MAX_TEXT_CHARS)
    id: str | None = ITEM_ID
    status: Literal["in_progress", "completed", "incomplete"] | None = ITEM_STATUS


class ReasoningText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["reasoning_text", "summary_text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ReasoningItem(BaseModel):
    """An earlier answer's reasoning, as the SDK echoes it: kept before that turn's function calls
    (harmony keeps it until the turn's final answer), else not used."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["reasoning"]
    id: str | None = ITEM_ID
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = ITEM_STATUS

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, data: object) -> object:
        return refuse_unsupported(data, {"encrypted_content": ()})


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionOutputItem | ReasoningItem, Field(discriminator="type")
]

InputItemModel = MessageItem | FunctionCallItem | FunctionOutputItem | ReasoningItem

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
"""Input item types this server understands; any other (item_reference, images, hosted tools'
calls) is refused by name."""


def item_list(items: list[Any]) -> list[Any]:
    """Input items as given, each with its `type` (an easy message `{role, content}` has none); an
    item of a type this server does not implement is refused by name."""
    typed = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and "type" not in item and "role" in item:
            item = {**item, "type": "message"}
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(kind, str) and kind not in ITEM_TYPES:
            raise_unsupported(f"input[{index}].type", f"input items of type `{kind}` are not supported")
        typed.append(item)
    return typed


def conversation(items: list[InputItemModel]) -> list[ChatMessage]:
    """The contract's messages for input items: consecutive function calls join one assistant
    message (with the reasoning item before them), each output becomes a `tool` message."""
    messages: list[ChatMessage] = []
    reasoning: str | None = None
    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning = "".join(p.text for p in item.content or item.summary)
            continue
        if isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls and not last.content:
                last.tool_calls.append(call)
            else:
                messages.append(
                    ChatMessage(role="assistant", content="", tool_calls=[call], reasoning_content=reasoning)
                )
        elif isinstance(item, FunctionOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            messages.append(ChatMessage(role="tool", content=output, tool_call_id=item.call_id))
        else:
            messages.append(ChatMessage(role=item.role, content=item.text()))
        reasoning = None
    if len(messages) > MAX_MESSAGES:
        raise ValidationFailed(f"The conversation holds {len(messages)} messages, over {MAX_MESSAGES}.")
    return messages


class FunctionTool(BaseModel):
    """A function tool in Responses' flat shape."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(default=None, strict=True)

    def contract(self) -> Tool:
        """The contract's tool (chat's nested shape)."""
        definition = FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict
        )
        return Tool(type="function", function=definition)


def tool_list(tools: list[Any]) -> list[Any]:
    """`tools` as given; a tool other than a function (web_search, file_search, mcp, ...) is
    refused by name."""
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "function":
            why = f"tools of type `{kind}` are not supported (only functions)"
            raise_unsupported(f"tools[{index}].type", why)
    return tools


class FunctionChoice(BaseModel):
    """`tool_choice` naming one function (Responses' flat shape)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)


ResponsesToolChoice = Literal["none", "auto", "required"] | FunctionChoice


def contract_choice(choice: ResponsesToolChoice | None) -> ToolChoice | None:
    """The contract's tool choice."""
    if isinstance(choice, FunctionChoice):
        return NamedToolChoice(type="function", function=FunctionName(name=choice.name))
    return choice


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or a named JSON schema (flat, as Responses has it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = Field(default=None, strict=True)

    def contract(self) -> ResponseFormat | None:
        """The contract's response_format (none for plain text, which changes nothing)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return _format(type="json_object")
        if self.name is None or self.schema_ is None:
            raise ValidationFailed("text.format of type `json_schema` needs `name` and `schema`.")
        schema = JsonSchemaFormat(
            name=self.name, description=self.description, schema=self.schema_, strict=self.strict
        )
        return _format(type="json_schema", json_schema=schema)


def _format(**fields: Any) -> ResponseFormat:
    try:
        return ResponseFormat(**fields)
    except ValueError as exc:  # a schema the grammar compiler cannot decode under
        raise ValidationFailed(f"text.format is invalid: {exc}") from None


class TextConfig(BaseModel):
    """`text`: the answer's format."""

    model_config = ConfigDict(extra="forbid")

    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, data: object) -> object:
        return refuse_unsupported(data, {"verbosity": ("medium",)})


class ReasoningConfig(BaseModel):
    """`reasoning`: gpt-oss's effort (minimal is taken as low); no summaries."""

    model_config = ConfigDict(extra="forbid")

    effort: Literal["minimal", "low", "medium", "high"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, data: object) -> object:
        return refuse_unsupported(data, {"summary": (), "generate_summary": ()})

    def contract_effort(self) -> Literal["low", "medium", "high"] | None:
        """The job's reasoning effort."""
        return "low" if self.effort == "minimal" else self.effort


def raise_unsupported(name: str, why: str) -> None:
    """Refuse parameter `name` from a validator (422 `unsupported_parameter`, naming it)."""
    message = f"`{name}` is not supported by this server: {why}"
    raise PydanticCustomError(UNSUPPORTED, "{message}", {"message": message, "parameters": {name: message}})
