"""The harmony chat format of gpt-oss, through `openai-harmony`: render requests, parse output channels.

No torch here: the scheduler and the API count harmony prompt tokens with the same renderer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.contract import JobRequest
from shared.errors import GptossError
from shared.harmony_tools import CallTracker, developer_content, history_names, prefill, turn_messages
from shared.tool_rules import offers_tools, several_calls
from shared.vocab import is_provisioned, point_harmony_at

REASONING_CHANNEL = "analysis"
"""Channel whose text a result returns as `reasoning`."""

FINAL_CHANNEL = "final"
"""Channel whose text a result returns as `content` (the job result's `text`)."""

DEFAULT_EFFORT = "medium"


class VocabUnavailable(GptossError):
    code, status, kind = "vocab_unavailable", 503, "server_error"


@dataclass(frozen=True)
class ChannelDelta:
    """New text of one channel, as the model produced it."""

    channel: str
    text: str


@functools.cache
def _encoding(vocab_dir: str | None) -> Any:
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    point_harmony_at(Path(vocab_dir) if vocab_dir else None)
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # harmony raises its own error type when it cannot fetch the vocab
        raise VocabUnavailable(
            f"harmony could not load the o200k vocabulary ({exc}); run scripts/setup or `gptoss vocab` "
            f"to provision it into {vocab_dir}."
        ) from None


class HarmonyChat:
    """gpt-oss's prompt format: requests in, prompt token ids out; stop tokens; output parsers."""

    def __init__(self, vocab_dir: Path | None):
        self._vocab_dir = vocab_dir

    @property
    def encoding(self) -> Any:
        """harmony's encoding, loaded once per process and vocabulary folder."""
        return _encoding(str(self._vocab_dir) if self._vocab_dir else None)

    def ready(self) -> bool:
        """The vocabulary can be loaded without the network."""
        return self._vocab_dir is not None and is_provisioned(self._vocab_dir)

    def render(self, request: JobRequest) -> list[int]:
        """Prompt token ids of `request`, ending where the assistant's next message starts (with the
        header of a call when `tool_choice` names a function or requires one)."""
        from openai_harmony import Conversation, Role

        conversation = Conversation.from_messages(harmony_messages(request))
        ids = list(self.encoding.render_conversation_for_completion(conversation, Role.ASSISTANT))
        return ids + prefill(self.encoding, request)

    def stop_token_ids(self, request: JobRequest | None = None) -> list[int]:
        """Tokens that end the assistant's turn (`<|return|>`, `<|call|>`), not each message's `<|end|>`;
        without `<|call|>` when `request` allows several calls (its parser ends the turn after the last)."""
        stops = list(self.encoding.stop_tokens_for_assistant_actions())
        if request is not None and several_calls(request):
            call = self.encode("<|call|>")[0]
            stops = [t for t in stops if t != call]
        return stops

    def parser(self, request: JobRequest | None = None) -> HarmonyParser:
        """A parser for one generation's tokens (of `request`: its prefilled header read first, its
        function calls picked out)."""
        if request is None:
            return HarmonyParser(self.encoding)
        return HarmonyParser(self.encoding, prefill(self.encoding, request), offers_tools(request))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, harmony's special tokens included."""
        return list(self.encoding.encode(text, allowed_special="all"))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`."""
        return str(self.encoding.decode(ids))


def harmony_messages(request: JobRequest) -> list[Any]:
    """The harmony messages of a request: a system message with the reasoning effort, the client's
    system and developer messages as developer instructions, then the conversation.

    OpenAI's harmony guide maps the chat "system" prompt to the developer message; harmony's own
    system message carries identity, reasoning effort and channels. A raw `prompt` is one user turn.
    """
    from openai_harmony import Message, ReasoningEffort, Role, SystemContent

    effort = ReasoningEffort(str(request.reasoning_effort or DEFAULT_EFFORT).capitalize())
    messages = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))]
    turns = request.messages or []
    instructions = "\n\n".join(m.content for m in turns if m.role in ("system", "developer"))
    developer = developer_content(instructions, request)
    if developer is not None:
        messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    names = history_names(request)
    for turn in turns:
        if turn.role == "user":
            messages.append(Message.from_role_and_content(Role.USER, turn.content))
        elif turn.role == "tool" or turn.tool_calls:
            messages.extend(turn_messages(turn, names))
        elif turn.role == "assistant":
            # Earlier answers go back as final-channel messages; their reasoning is dropped, as
            # harmony prescribes for completed turns.
            messages.append(
                Message.from_role_and_content(Role.ASSISTANT, turn.content).with_channel(FINAL_CHANNEL)
            )
    if request.prompt is not None:
        messages.append(Message.from_role_and_content(Role.USER, request.prompt))
    return messages


class HarmonyParser:
    """Splits generated tokens into channels as they stream; `reasoning` and `content` at the end.

    A model that breaks the format (a tiny or undertrained one) does not fail the job: the rest of
    its tokens are decoded as final text.
    """

    def __init__(self, encoding: Any, prefill: list[int] | None = None, calls: bool = False):
        from openai_harmony import Role, StreamableParser

        self._encoding = encoding
        self._parser = StreamableParser(encoding, Role.ASSISTANT)
        for token in prefill or []:  # the header the prompt began for the model
            self._parser.process(token)
        self._calls = CallTracker(encoding, calls)
        self._text: dict[str, list[str]] = {}
        self._broken: list[int] | None = None
        self.valid = True
        self.over = False
        """The turn ended after a call (the model went on with something other than another call)."""

    def feed(self, token: int) -> ChannelDelta | None:
        """Parse one token; the text it added to a channel, if any (a function call's arguments come
        on the call's own channel, `shared.tools.call_channel`)."""
        from openai_harmony import StreamState

        if self._broken is not None:
            self._broken.append(token)
            return None
        if self.over or self._calls.ends_turn(token):
            self.over = True
            return None
        parser = self._parser
        try:
            parser.process(token)
        except Exception:  # harmony's HarmonyError: the output left the format
            self.valid, self._broken = False, [token]
            return None
        if self._calls.header_ends_turn(parser.state == StreamState.CONTENT, parser.current_recipient):
            self.over = True
            return None
        if self._calls.is_call(token) and (empty := self._calls.empty_call(parser.messages)) is not None:
            return self._add(empty, "{}")
        delta = parser.last_content_delta
        if not delta:
            return None
        channel: str | None = parser.current_channel or FINAL_CHANNEL
        if parser.current_recipient is not None:
            channel = self._calls.channel(parser.current_recipient, len(parser.messages))
            if channel is None:  # a message to a recipient that is no call of the client's functions
                return None
        return self._add(channel or FINAL_CHANNEL, delta)

    def _add(self, channel: str, text: str) -> ChannelDelta:
        self._text.setdefault(channel, []).append(text)
        return ChannelDelta(channel, text)

    def finish(self) -> ChannelDelta | None:
        """Close the stream; text of tokens that were left outside the format, if any."""
        if self._broken is None:
            return None
        ids = [t for t in self._broken if not self._encoding.is_special_token(t)]
        text = str(self._encoding.decode(ids)) if ids else ""
        self._broken = []
        if not text:
            return None
        self._text.setdefault(FINAL_CHANNEL, []).append(text)
        return ChannelDelta(FINAL_CHANNEL, text)

    def in_final_message(self, token: int | None = None) -> bool:
        """The next token (`token`, if known) is text of the final channel's message (not a header,
        not the special token that ends it): where structured outputs and content logprobs apply."""
        from openai_harmony import StreamState

        parser = self._parser
        return (
            self._broken is None
            and parser.state == StreamState.CONTENT
            and parser.current_channel == FINAL_CHANNEL
            and (token is None or not self._encoding.is_special_token(token))
        )

    def channel_text(self, channel: str) -> str:
        """All text of `channel` so far."""
        return "".join(self._text.get(channel, []))

    @property
    def reasoning(self) -> str:
        """Text of the analysis channel."""
        return self.channel_text(REASONING_CHANNEL)

    @property
    def content(self) -> str:
        """Text of the final channel."""
        return self.channel_text(FINAL_CHANNEL)
