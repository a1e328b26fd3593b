"""OpenAI's wire format: request models for chat completions and completions, the response objects
(chat.completion, chat.completion.chunk, text_completion, model list), and pure conversions from our
job contract. A request is refused (422) rather than partly ignored: unknown fields are
`extra_forbidden`, and OpenAI parameters this server does not implement are accepted only at their
defaults (null, or e.g. `n: 1`, `frequency_penalty: 0`, `tools: []`), else `unsupported_parameter`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared.contract import (
    MAX_CHOICES,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    ChatMessage,
    JobResult,
    JobSubmission,
    SubmittedPriority,
    TokenLogprob,
    Usage,
    refuse_batch_priority,
)
from shared.errors import ValidationFailed
from shared.harmony import FINAL_CHANNEL
from shared.json_body import invalid_fields
from shared.openai.logprobs import (
    MAX_COMPLETION_LOGPROBS,
    ChatLogprobFields,
    ChoiceLogprobs,
    TextLogprobs,
    chat_logprobs,
    choice_fields,
    completion_logprob_fields,
    text_logprobs,
)
from shared.openai.params import (
    CHAT_MESSAGE_UNSUPPORTED,
    CHAT_UNSUPPORTED,
    COMPLETION_UNSUPPORTED,
    SAMPLING_UNSUPPORTED,
    Defaults,
    refuse_unsupported,
)
from shared.openai.tool_calls import CallDeltas, ChatToolFields, DeltaToolCall, FinishReason, text_finish
from shared.tools import MAX_CALL_ID_CHARS, MAX_TOOLS, ToolCall


class TextPart(BaseModel):
    """One part of a message's content; only text is understood."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class OpenAIMessage(BaseModel):
    """A chat message as OpenAI clients send it: content a string or a list of text parts (null only
    for an assistant's tool calls)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    reasoning_content: str | None = Field(
        default=None,
        max_length=MAX_TEXT_CHARS,
        description="An earlier answer's reasoning, as sent back by clients: kept before that turn's tool "
        "calls until its final answer, else not used (gpt-oss drops the reasoning of earlier turns)",
    )
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=MAX_CALL_ID_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, data: object) -> object:
        return refuse_unsupported(data, CHAT_MESSAGE_UNSUPPORTED)

    @model_validator(mode="after")
    def _parts_fit(self) -> OpenAIMessage:
        if isinstance(self.content, list) and sum(len(p.text) for p in self.content) > MAX_TEXT_CHARS:
            raise PydanticCustomError(
                "string_too_long",
                "The text parts together should have at most {max_length} characters",
                {"max_length": MAX_TEXT_CHARS},
            )
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing", "`content` is required unless an assistant sends tool_calls")
        return self

    def plain(self) -> ChatMessage:
        """Our message: the text parts joined; an assistant's reasoning kept only before its calls."""
        content = (
            self.content if isinstance(self.content, str | None) else "".join(p.text for p in self.content)
        )
        try:
            return ChatMessage(
                role=self.role, content=content or "", tool_calls=self.tool_calls or None,
                tool_call_id=self.tool_call_id,
                reasoning_content=self.reasoning_content if self.tool_calls else None,
            )  # fmt: skip
        except ValueError as exc:  # the contract's own checks (tool fields that fit the role)
            raise ValidationFailed(f"A message has invalid fields: {exc}") from None


class StreamOptions(BaseModel):
    """`stream_options`: whether the stream ends with a chunk carrying usage."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(default=False, strict=True)


class SamplingFields(BaseModel):
    """What both endpoints accept besides the input (numbers and flags strict, as in JobRequest)."""

    model_config = ConfigDict(extra="forbid")

    UNSUPPORTED_PARAMS: ClassVar[dict[str, Defaults]] = SAMPLING_UNSUPPORTED

    model: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="Served model (name or alias)"
    )
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)
    stop: str | list[str] | None = None
    stream: bool = Field(default=False, strict=True)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES, strict=True, description="Choices to generate")
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256, description="The end user (accepted, not used)")
    profile: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="Extension: the serving profile"
    )
    priority: SubmittedPriority = Field(default="normal", description="Extension")
    cache: bool = Field(
        default=True, strict=True, description="Extension: false never uses the response cache"
    )
    session_id: str | None = Field(
        default=None, max_length=128, description="Extension: the multi-turn session this turn belongs to"
    )

    _no_batch_priority = field_validator("priority", mode="before")(refuse_batch_priority)

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, data: object) -> object:
        return refuse_unsupported(data, cls.UNSUPPORTED_PARAMS)

    def include_usage(self) -> bool:
        """The stream should end with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _submission(self, **fields: Any) -> JobSubmission:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        fields.update(choice_fields(self.n, self.stream))
        try:
            return JobSubmission(
                model=self.model, max_tokens=self.max_tokens, temperature=self.temperature,
                top_p=self.top_p, seed=self.seed, stop=stop, profile=self.profile,
                priority=self.priority, cache=self.cache, session_id=self.session_id, **fields,
            )  # fmt: skip
        except ValueError as exc:  # the job contract's own checks (stop sequences, ...)
            raise invalid_fields(exc) from None


class ChatCompletionRequest(SamplingFields, ChatLogprobFields, ChatToolFields):
    """`POST /v1/chat/completions`."""

    UNSUPPORTED_PARAMS: ClassVar[dict[str, Defaults]] = CHAT_UNSUPPORTED

    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, strict=True, description="Preferred over max_tokens"
    )
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        default=None, description="gpt-oss reasoning effort (minimal is taken as low)"
    )

    def submission(self) -> JobSubmission:
        """The job this request runs as."""
        effort = "low" if self.reasoning_effort == "minimal" else self.reasoning_effort
        calls = self.tool_fields()
        messages = [m.plain() for m in self.messages]
        calls.update(self.logprob_fields())
        job = self._submission(messages=messages, reasoning_effort=effort, **calls)
        if self.max_completion_tokens is not None:
            job = job.model_copy(update={"max_tokens": self.max_completion_tokens})
        return job


class CompletionRequest(SamplingFields):
    """`POST /v1/completions` (legacy text completion)."""

    UNSUPPORTED_PARAMS: ClassVar[dict[str, Defaults]] = COMPLETION_UNSUPPORTED

    prompt: str | list[str] = Field(max_length=MAX_TEXT_CHARS)
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_COMPLETION_LOGPROBS, strict=True, description="Alternatives per token"
    )

    def submission(self) -> JobSubmission:
        """The job this request runs as."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValidationFailed("prompt must be one string (batches of prompts are not supported).")
            prompt = prompt[0]
        return self._submission(prompt=prompt, **completion_logprob_fields(self.logprobs))


class AssistantMessage(BaseModel):
    """The answer of a chat completion; `reasoning_content` is gpt-oss's analysis channel."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    """`chat.completion`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """`chat.completion.chunk`: one Server-Sent Event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: TextLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class TextCompletion(BaseModel):
    """`text_completion` (each streamed event is one too, without usage until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptoss"
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def chat_completion(job_id: str, created: int, result: JobResult) -> ChatCompletion:
    """The chat completion of a finished job."""
    content = None if result.tool_calls and not result.text else result.text
    message = AssistantMessage(
        content=content, reasoning_content=result.reasoning or None, tool_calls=result.tool_calls or None
    )
    choice = ChatChoice(
        message=message, finish_reason=result.finish_reason, logprobs=chat_logprobs(result.logprobs)
    )
    choices = [choice] + [
        ChatChoice(index=c.index, finish_reason=c.finish_reason, logprobs=chat_logprobs(c.logprobs),
                   message=AssistantMessage(content=c.text, reasoning_content=c.reasoning or None))
        for c in (result.choices or [])[1:]
    ]  # fmt: skip
    return ChatCompletion(
        id=f"chatcmpl-{job_id}", created=created, model=result.model, choices=choices, usage=result.usage
    )


def text_completion(job_id: str, created: int, result: JobResult) -> TextCompletion:
    """The text completion of a finished job."""
    choice = TextChoice(
        text=result.text,
        finish_reason=text_finish(result.finish_reason),
        logprobs=text_logprobs(result.logprobs),
    )
    choices = [choice] + [
        TextChoice(text=c.text, index=c.index, finish_reason=text_finish(c.finish_reason),
                   logprobs=text_logprobs(c.logprobs))
        for c in (result.choices or [])[1:]
    ]  # fmt: skip
    return TextCompletion(
        id=f"cmpl-{job_id}", created=created, model=result.model, choices=choices, usage=result.usage
    )


class ChunkMaker:
    """Turns a job's events into the chunks of one streamed response (chat or text completion)."""

    def __init__(self, job_id: str, created: int, model: str, chat: bool, include_usage: bool):
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"
        self.created, self.model, self.chat, self.include_usage = created, model, chat, include_usage
        self._calls = CallDeltas()

    def opening(self) -> list[BaseModel]:
        """The first chunk, sent at once: a chat's assistant role."""
        return [self._chat(Delta(role="assistant", content=""))] if self.chat else []

    def token(self, channel: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[BaseModel]:
        """A piece of the answer (final channel, with its tokens' `logprobs` when asked), of a tool
        call, or, for chats, of the reasoning."""
        calls = self._calls.deltas(channel, text)
        if calls is not None:
            return [self._chat(Delta(tool_calls=c)) for c in calls] if self.chat else []
        if channel == FINAL_CHANNEL:
            entries = [TokenLogprob.model_validate(e) for e in logprobs] if logprobs is not None else None
            if self.chat:
                return [self._chat(Delta(content=text), logprobs=chat_logprobs(entries))]
            return [self._text(text, logprobs=text_logprobs(entries))]
        return [self._chat(Delta(reasoning_content=text))] if self.chat else []

    def closing(self, result: JobResult) -> list[BaseModel]:
        """The chunk with the finish reason, and the usage chunk if asked for."""
        last: BaseModel = (
            self._chat(Delta(), result.finish_reason)
            if self.chat
            else self._text("", text_finish(result.finish_reason))
        )
        chunks = [last]
        if self.include_usage:
            usage: dict[str, Any] = {"choices": [], "usage": result.usage}
            chunks.append(
                ChatCompletionChunk(id=self.id, created=self.created, model=self.model, **usage)
                if self.chat
                else TextCompletion(id=self.id, created=self.created, model=self.model, **usage)
            )
        return chunks

    def _chat(
        self, delta: Delta, finish: FinishReason | None = None, logprobs: ChoiceLogprobs | None = None
    ) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _text(
        self, text: str, finish: Literal["stop", "length"] | None = None, logprobs: TextLogprobs | None = None
    ) -> TextCompletion:
        choice = TextChoice(text=text, finish_reason=finish, logprobs=logprobs)
        return TextCompletion(id=self.id, created=self.created, model=self.model, choices=[choice])
