"""Tool calling in harmony, all through `openai-harmony`: a request's functions in the developer
message, earlier calls and tool results rendered back, the assistant's header prefilled for a named
or required call, and the calls picked out of generated tokens as they stream.

A call is an assistant message on the `commentary` channel to the recipient `functions.<name>`, its
arguments JSON (`<|constrain|>json`), ending in `<|call|>`; the tool's answer comes back as a message
from the author `functions.<name>` to the assistant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.tool_rules import call_names, offers_tools
from shared.tools import FUNCTIONS, InvalidToolSchema, NamedToolChoice, call_channel, new_call_id

if TYPE_CHECKING:
    from shared.contract import ChatMessage, JobRequest

CALL_CHANNEL = "commentary"
"""Harmony's channel of function calls (and of tool results)."""

JSON_CONTENT = "<|constrain|>json"
"""The content type gpt-oss gives a call's arguments."""


def function_tools(request: JobRequest) -> list[Any]:
    """The request's functions as harmony's tool descriptions (none with `tool_choice: none`: the
    model is not shown what it may not call)."""
    from openai_harmony import ToolDescription

    if not offers_tools(request):
        return []
    return [
        ToolDescription.new(t.function.name, t.function.description or "", parameters=t.function.parameters)
        for t in request.tools or []
    ]


def developer_content(instructions: str, request: JobRequest) -> Any | None:
    """Harmony's developer message: the client's instructions and its functions (None: neither)."""
    from openai_harmony import DeveloperContent

    tools = function_tools(request)
    if not instructions and not tools:
        return None
    developer = DeveloperContent.new()
    if instructions:
        developer = developer.with_instructions(instructions)
    if tools:
        try:
            developer = developer.with_function_tools(tools)
        except Exception as exc:  # harmony's own check of a schema jsonschema let through
            raise InvalidToolSchema(f"A tool's parameters cannot be rendered for the model: {exc}") from None
    return developer


def turn_messages(turn: ChatMessage, names: dict[str, str]) -> list[Any]:
    """Harmony messages of an assistant turn that made calls (its reasoning, any text, each call) or
    of a tool's answer; `names`: the function each call id named."""
    from openai_harmony import Author, Message, Role

    if turn.role == "tool":
        name = f"{FUNCTIONS}.{names[turn.tool_call_id or '']}"
        author = Author.new(Role.TOOL, name)
        return [
            Message.from_author_and_content(author, turn.content)
            .with_channel(CALL_CHANNEL)
            .with_recipient("assistant")
        ]
    messages = []
    if turn.reasoning_content:
        # Kept while the turn goes on (tool results follow); harmony drops it once an answer ends it.
        messages.append(
            Message.from_role_and_content(Role.ASSISTANT, turn.reasoning_content).with_channel("analysis")
        )
    if turn.content:
        messages.append(
            Message.from_role_and_content(Role.ASSISTANT, turn.content).with_channel(CALL_CHANNEL)
        )
    for call in turn.tool_calls or []:
        message = Message.from_role_and_content(Role.ASSISTANT, call.function.arguments)
        messages.append(
            message.with_channel(CALL_CHANNEL)
            .with_recipient(f"{FUNCTIONS}.{call.function.name}")
            .with_content_type(JSON_CONTENT)
        )
    return messages


def history_names(request: JobRequest) -> dict[str, str]:
    """The function each earlier call id named (refusing a tool message that answers none)."""
    return call_names(request.messages or [])


def prefill(encoding: Any, request: JobRequest) -> list[int]:
    """Tokens that begin the assistant's message for it, after `<|start|>assistant`: for a named
    function, the whole header of a call to it (the model writes only the arguments); for
    `required`, the header up to the namespace (` to=functions`: the model picks the function);
    else none. Cut from harmony's own rendering of a call, so the tokens are harmony's."""
    from openai_harmony import Message, Role

    choice = request.tool_choice
    if not offers_tools(request) or not (isinstance(choice, NamedToolChoice) or choice == "required"):
        return []
    name = (
        choice.function.name
        if isinstance(choice, NamedToolChoice)
        else (request.tools or [])[0].function.name
    )
    call = Message.from_role_and_content(Role.ASSISTANT, "").with_channel(CALL_CHANNEL)
    call = call.with_recipient(f"{FUNCTIONS}.{name}").with_content_type(JSON_CONTENT)
    rendered = list(encoding.render(call))  # <|start|> assistant <header> <|message|> <|call|>
    header = rendered[2:-1]
    if isinstance(choice, NamedToolChoice):
        return header
    namespace = encoding.encode(FUNCTIONS, allowed_special=set())[0]
    return header[: header.index(namespace) + 1]


class CallTracker:
    """Which generated messages are calls of the client's functions: each gets an index and a fresh
    id, which make its token events' channel. After a `<|call|>` the turn goes on only with another
    call: `<|start|>assistant` and a header to `functions.*`; anything else (the model beginning the
    tool's answer, which only the tool writes, or an answer before any result) ends the turn."""

    def __init__(self, encoding: Any, wanted: bool):
        def one(text: str) -> int:
            return int(encoding.encode(text, allowed_special="all")[0])

        self._call, self._start, self._assistant = one("<|call|>"), one("<|start|>"), one("assistant")
        self._wanted = wanted
        self._after_call: int | None = None  # tokens seen since the last <|call|>, while it matters
        self._message = -1  # the parsed message the current call is
        self._calls = 0
        self._channel: str | None = None

    def ends_turn(self, token: int) -> bool:
        """Whether `token` (not parsed yet) ends the turn: after a call, anything but `<|start|>assistant`."""
        if token == self._call:
            self._after_call = 0
            return False
        if self._after_call is None:
            return False
        self._after_call += 1
        expected = (self._start, self._assistant)
        return self._after_call <= len(expected) and token != expected[self._after_call - 1]

    def header_ends_turn(self, in_content: bool, recipient: str | None) -> bool:
        """Whether the message just opened (its header parsed) ends the turn: after a call, only
        another call goes on."""
        if self._after_call is None or not in_content:
            return False
        self._after_call = None
        return not (recipient or "").startswith(f"{FUNCTIONS}.")

    def channel(self, recipient: str | None, message: int) -> str | None:
        """The event channel of text of message number `message`, addressed to `recipient`; None when
        it is not a call of the client's functions (or calls are not wanted): the text is dropped."""
        if not self._wanted or not (recipient or "").startswith(f"{FUNCTIONS}."):
            return None
        if message != self._message:
            name = (recipient or "")[len(FUNCTIONS) + 1 :]
            self._message, self._channel = message, call_channel(self._calls, new_call_id(), name)
            self._calls += 1
        return self._channel

    def is_call(self, token: int) -> bool:
        """`token` is `<|call|>`: it ends a call."""
        return token == self._call

    def empty_call(self, messages: list[Any]) -> str | None:
        """The channel of the call that just ended (the last of the parsed `messages`) if none of its
        arguments came: it gets `{}`, as a function without parameters is called. Else None."""
        if not messages or self._message == len(messages) - 1:
            return None
        return self.channel(messages[-1].recipient, len(messages) - 1)
