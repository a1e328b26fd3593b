"""Logprobs, structured outputs and several choices on OpenAI's endpoints: the request fields
(`logprobs`, `top_logprobs`, `response_format`, `n`) as the job contract takes them, and the answer's
logprobs in each endpoint's format (chat: `choices[].logprobs.content`; legacy completions: parallel
lists)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shared.contract import MAX_TOP_LOGPROBS, ResponseFormat, TokenLogprob
from shared.errors import UnsupportedParameter, ValidationFailed

MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's limit on the legacy completions' `logprobs` (alternatives per token)."""


class ChatLogprobFields(BaseModel):
    """What a chat completion request may ask: the answer's logprobs, and its structure."""

    logprobs: bool | None = Field(default=None, strict=True, description="The answer's tokens' logprobs")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True, description="Alternatives per token"
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="text, json_object, or json_schema (decoded under its grammar)"
    )

    def logprob_fields(self) -> dict[str, Any]:
        """The job fields these ask for (none at their defaults, so the job is the same as one that
        never sent them)."""
        fields: dict[str, Any] = {}
        if self.logprobs:
            fields.update(logprobs=True, top_logprobs=self.top_logprobs)
        elif self.top_logprobs is not None:
            raise ValidationFailed("`top_logprobs` needs `logprobs: true`.")
        if self.response_format is not None and self.response_format.type != "text":
            fields["response_format"] = self.response_format
        return fields


class ChoiceLogprobs(BaseModel):
    """A chat choice's `logprobs`."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class TextLogprobs(BaseModel):
    """A legacy text choice's `logprobs`: parallel lists over the answer's tokens."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    return ChoiceLogprobs(content=logprobs) if logprobs is not None else None


def text_logprobs(logprobs: list[TokenLogprob] | None) -> TextLogprobs | None:
    if logprobs is None:
        return None
    offsets, at = [], 0
    for entry in logprobs:
        offsets.append(at)
        at += len(entry.token)
    return TextLogprobs(
        tokens=[e.token for e in logprobs],
        token_logprobs=[e.logprob for e in logprobs],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in logprobs],
        text_offset=offsets,
    )


def completion_logprob_fields(logprobs: int | None) -> dict[str, Any]:
    """The legacy completions' `logprobs` (alternatives per token, 0-5) as job fields."""
    if logprobs is None:
        return {}
    return {"logprobs": True, "top_logprobs": logprobs}


def choice_fields(n: int | None, stream: bool) -> dict[str, Any]:
    """`n` as a job field (none at 1); several choices are not streamed yet: refused by name."""
    if n is None or n == 1:
        return {}
    if stream:
        raise UnsupportedParameter(
            "`n` > 1 is not supported with `stream: true` by this server yet: ask one choice, or no stream.",
            details=[{"loc": ["n"], "msg": "not streamed", "type": "unsupported_parameter"}],
        )
    return {"n": n}
