"""One request's completion as it grows token by token: its text by channel (cut at stop strings),
whether it has ended, and what it produced. A batch row carries one."""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from shared.harmony import FINAL_CHANNEL, REASONING_CHANNEL
from shared.tools import ToolCall, calls_of
from workers.output import OutputText
from workers.sampling import TokenLogprob

if TYPE_CHECKING:
    from workers.grammar import Constraint

TokenSink = Callable[[str, str], None]
"""Receives each piece of generated text as (channel, text) as soon as it is final."""


@dataclass(frozen=True)
class Generation:
    """What one request produced."""

    text: str
    finish_reason: Literal["stop", "length", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    token_ids: tuple[int, ...] = ()
    cancelled: bool = False
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the session's cache, not computed."""
    token_gaps: Sequence[float] = field(default=(), compare=False, repr=False)
    """Seconds between each generated token and the one before it (the per-token ITL); timing, not
    output, so two generations of the same tokens are equal whatever their gaps."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """The answer's tokens' log-probabilities, when asked for (its content tokens: no end token, no
    harmony header or reasoning)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The functions the model called (harmony's calls to `functions.*`), in order."""


class Completion:
    """The tokens of one request so far, turned into channel text as they come.

    `decode` takes each token (None at the end) and feeds `output`; `on_text` receives what is
    safe to stream; `on_first_token` is called once, when the first token exists.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        eos: set[int],
        output: OutputText,
        decode: Callable[[int | None], None],
        on_first_token: Callable[[], None] | None = None,
        on_text: TokenSink | None = None,
        has_reasoning: bool = False,
        in_content: Callable[[], bool] | None = None,
    ):
        self.prompt_ids, self.max_tokens, self.eos = prompt_ids, max_tokens, eos
        self._output, self._decode = output, decode
        self._on_first_token, self._on_text = on_first_token, on_text
        self._has_reasoning = has_reasoning
        self._in_content = in_content
        self.constraint: Constraint | None = None
        """The answer's grammar (structured outputs), set by the runtime."""
        self.logprobs: list[TokenLogprob] | None = None
        self.token_ids: list[int] = []
        self.cached_tokens = 0
        # Gaps as plain doubles, one per token after the first: observed once, when the request ends.
        self.token_gaps = array("d")
        self._last_token_at: float | None = None

    def add(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """One new token (with its log-probabilities, when asked for)."""
        now = time.perf_counter()
        if self._last_token_at is not None:
            self.token_gaps.append(now - self._last_token_at)
        self._last_token_at = now
        self.token_ids.append(token)
        if len(self.token_ids) == 1 and self._on_first_token is not None:
            self._on_first_token()
        if logprob is not None and token not in self.eos and self.in_content(token):
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs.append(logprob)
        self._decode(token)

    def in_content(self, token: int | None) -> bool:
        """The next token (`token`, if known) is answer text: every token of a chat template's
        answer; only harmony's final message (not its headers, reasoning or end tokens)."""
        return self._in_content is None or self._in_content(token)

    @property
    def ended(self) -> bool:
        """An end token, a stop string or max_tokens ended it."""
        return (
            self._output.stopped
            or len(self.token_ids) >= self.max_tokens
            or (bool(self.token_ids) and self.token_ids[-1] in self.eos)
        )

    @property
    def worst_case_tokens(self) -> int:
        """Prompt plus max_tokens: the most cache this request can need."""
        return len(self.prompt_ids) + self.max_tokens

    def result(self, cancelled: bool = False) -> Generation:
        """What the request produced (text still held back is released to `on_text` first)."""
        self._decode(None)
        for channel, text in self._output.flush():
            if self._on_text is not None:
                self._on_text(channel, text)
        ids = self.token_ids
        end_token = bool(ids) and ids[-1] in self.eos
        stopped = self._output.stopped or end_token or len(ids) < self.max_tokens
        reasoning = self._output.text(REASONING_CHANNEL) if self._has_reasoning else None
        calls = tuple(calls_of(self._output.channels()))
        return Generation(
            self._output.text(FINAL_CHANNEL),
            ("tool_calls" if calls else "stop") if stopped else "length",
            len(self.prompt_ids),
            len(ids),
            reasoning,
            tuple(ids),
            cancelled and not end_token,
            self.cached_tokens,
            self.token_gaps,
            tuple(self.logprobs) if self.logprobs is not None else None,
            calls,
        )
