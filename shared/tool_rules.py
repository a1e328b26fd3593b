"""What a request's tools mean for it: whether the model is shown functions, may call several, and
whether its tools, tool choice and tool messages fit together (422s with a code per problem). Apart
from shared/tools.py (the wire models), which the job contract itself is built of."""

from __future__ import annotations

from shared.contract import ChatMessage, JobRequest
from shared.errors import UnsupportedParameter
from shared.tools import (
    DuplicateToolName,
    FunctionDefinition,
    InvalidToolSchema,
    NamedToolChoice,
    UnknownToolCallId,
    UnknownToolChoice,
)


def offers_tools(request: JobRequest) -> bool:
    """The model is shown functions: the request has tools and does not say `tool_choice: none`."""
    return bool(request.tools) and request.tool_choice != "none"


def uses_tools(request: JobRequest) -> bool:
    """The request offers tools or carries earlier calls or tool results."""
    return bool(request.tools) or any(m.role == "tool" or m.tool_calls for m in request.messages or [])


def several_calls(request: JobRequest) -> bool:
    """The model may make more than one call in its turn: tools offered, `parallel_tool_calls` not
    false, and no single function named."""
    return (
        offers_tools(request)
        and request.parallel_tool_calls is not False
        and not isinstance(request.tool_choice, NamedToolChoice)
    )


def check_tools(request: JobRequest) -> None:
    """Refuse a request whose tools, tool choice and tool messages do not fit together (422 with a
    code per kind of problem)."""
    tools = request.tools or []
    names: set[str] = set()
    for index, tool in enumerate(tools):
        function = tool.function
        if function.name in names:
            raise DuplicateToolName(
                f"Two tools are named `{function.name}`; each function needs its own name."
            )
        names.add(function.name)
        if function.strict:
            raise UnsupportedParameter(
                f"`tools[{index}].function.strict: true` is not supported by this server: leave it unset "
                "or send false (arguments are not decoded under the schema).",
                details=[{"loc": ["tools", index, "function", "strict"], "msg": "not supported"}],
            )
        _check_schema(index, function)
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        offered = ", ".join(f"`{n}`" for n in sorted(names)) or "none"
        raise UnknownToolChoice(
            f"`tool_choice` names the function `{choice.function.name}`, which is not among the "
            f"request's tools (offered: {offered})."
        )
    if choice == "required" and not tools:
        raise UnknownToolChoice("`tool_choice: required` needs at least one tool in `tools`.")
    call_names(request.messages or [])


def call_names(messages: list[ChatMessage]) -> dict[str, str]:
    """The function each earlier call id named; UnknownToolCallId for a tool message that answers no
    call made before it."""
    named: dict[str, str] = {}
    for index, message in enumerate(messages):
        for call in message.tool_calls or []:
            named[call.id] = call.function.name
        if message.role == "tool" and message.tool_call_id not in named:
            raise UnknownToolCallId(
                f"messages[{index}] answers the tool call `{message.tool_call_id}`, which no earlier "
                "assistant message made."
            )
    return named


def _check_schema(index: int, function: FunctionDefinition) -> None:
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    schema = function.parameters
    if schema is None:
        return
    where = f"`tools[{index}].function.parameters` (`{function.name}`)"
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidToolSchema(f"{where} is not a valid JSON Schema: {exc.message}") from None
    if schema.get("type", "object") != "object":
        raise InvalidToolSchema(f'{where} must describe an object (`"type": "object"`).')
