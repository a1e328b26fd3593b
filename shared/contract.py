"""The job contract: what a client submits, what a worker returns, what a poll shows."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.tools import MAX_CALL_ID_CHARS, MAX_TOOLS, Tool, ToolCall, ToolChoice

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on stop sequences per request."""

MAX_MESSAGES = 512
"""Messages one conversation may hold."""

MAX_TEXT_CHARS = 400_000
"""Characters one message or prompt may hold (the body-size limit usually bites first)."""

MAX_STOP_CHARS = 256
"""Characters one stop sequence may hold."""

MAX_NAME_CHARS = 128
"""Characters of a model or profile name."""

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
"""What a session id may hold (it names Redis keys)."""

MIN_TEMPERATURE = 0.01
"""Smallest temperature above 0 (greedy): logits divided by less overflow to inf and the sampler's
probabilities to NaN, which fails the whole batch's step. vLLM raises smaller ones to 0.01 with a
warning; a request here is refused instead, so it says what it gets."""

MIN_TOP_P = 1e-6
"""Smallest top_p: below it top_p keeps only the most likely token of any vocabulary up to a million
tokens (which temperature 0 asks for plainly), and below float32's ~1.4e-45 it rounds to 0 and
empties the nucleus. OpenAI and vLLM take 0 < top_p <= 1."""


MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on `top_logprobs`."""

MAX_CHOICES = 16
"""Most choices (`n`) one request may ask for: each is a row of the worker's batch."""


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: a named JSON schema the answer must follow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = Field(default=None, strict=True)


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or a JSON schema (compiled here, so a
    schema that cannot be decoded under is refused at submission)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _usable(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is given exactly when `type` is `json_schema`")
        from shared.structured import InvalidSchema, grammar_for

        try:
            grammar_for(self.wire())
        except InvalidSchema as exc:
            raise ValueError(exc.message) from None
        return self

    def wire(self) -> dict[str, Any]:
        """As OpenAI's JSON (`schema`, not `schema_`)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = Field(default="", max_length=MAX_TEXT_CHARS)
    tool_calls: list[ToolCall] | None = Field(
        default=None, max_length=MAX_TOOLS, description="An assistant's calls, sent back in the next request"
    )
    tool_call_id: str | None = Field(
        default=None, max_length=MAX_CALL_ID_CHARS, description="The call a `tool` message answers"
    )
    reasoning_content: str | None = Field(
        default=None,
        max_length=MAX_TEXT_CHARS,
        description="An assistant's reasoning before its tool calls (harmony keeps it until the turn's "
        "final answer; other reasoning of earlier turns is dropped)",
    )

    @model_validator(mode="after")
    def _tool_fields_fit_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries `tool_calls`")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a `tool` message needs `tool_call_id`, and only a tool message carries one")
        if "content" not in self.model_fields_set and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("`content` is required (only an assistant's message of tool calls may omit it)")
        return self


class JobRequest(BaseModel):
    """A generation request: chat `messages` or a raw `prompt`, and sampling parameters. Numbers and
    flags are strict: a string or a bool is no integer, a string no bool, and floats are finite (an
    integer is still a float: JSON clients send `temperature: 1`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="Registry name; unset: the served model"
    )
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, strict=True, description="New tokens at most")
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, strict=True, allow_inf_nan=False,
        description="0 means greedy, else at least 0.01; unset: the profile's",
    )  # fmt: skip
    top_p: float | None = Field(
        default=None, ge=MIN_TOP_P, le=1.0, strict=True, allow_inf_nan=False,
        description="At least 1e-6; unset: the profile's",
    )  # fmt: skip
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)
    stop: list[str] | None = Field(default=None, description="Up to 4 stop sequences")
    profile: str | None = Field(
        default=None,
        max_length=MAX_NAME_CHARS,
        description="Profile whose defaults apply; unset: the server's",
    )
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        default=None, description="Harmony models' reasoning effort; unset: the profile's"
    )
    session_id: str | None = Field(
        default=None,
        pattern=SESSION_ID_PATTERN,
        description="Multi-turn chat session: its turns go to the worker that keeps its KV cache",
    )
    cache: bool = Field(
        default=True, strict=True, description="false: never answer from, nor store into, the response cache"
    )
    tools: list[Tool] | None = Field(
        default=None,
        max_length=MAX_TOOLS,
        description="Functions the model may call (JSON-schema parameters)",
    )
    tool_choice: ToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required, or a named function"
    )
    parallel_tool_calls: bool | None = Field(
        default=None, strict=True, description="false: at most one call per turn; unset: several allowed"
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="Structured outputs: the answer decoded under a JSON schema's grammar"
    )
    logprobs: bool = Field(default=False, strict=True, description="Return the answer's tokens' logprobs")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True, description="Alternatives per token (0-20)"
    )
    n: int = Field(
        default=1, ge=1, le=MAX_CHOICES, strict=True, description="Choices to generate (rows of one batch)"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"a stop sequence may hold at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature_workable(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` or `prompt`")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        if self.n > 1 and self.session_id is not None:
            raise ValueError("`n` > 1 cannot continue a session (which choice would the next turn follow?)")
        if self.n > 1 and getattr(self, "tools", None):
            raise ValueError("`n` > 1 with `tools` is not supported by this server yet: ask one choice")
        return self


class PromptTokensDetails(BaseModel):
    """What OpenAI reports of the prompt's tokens: how many came from a cache (a session's KV)."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of one job."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    """One likely token at a position: its text, log-probability and UTF-8 bytes (OpenAI's format)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """One token of the answer with its log-probability and the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceResult(BaseModel):
    """One of several choices (`n` > 1) of a job's answer."""

    index: int
    text: str
    reasoning: str | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: list[TokenLogprob] | None = None


class JobResult(BaseModel):
    """What a worker stores as the RQ job's result (its first choice; every choice in `choices` when
    the request asked for several)."""

    text: str
    reasoning: str | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    tool_calls: list[ToolCall] | None = Field(default=None, description="The calls the model made, if any")
    logprobs: list[TokenLogprob] | None = Field(
        default=None, description="The answer's tokens' logprobs, when asked for (raw: before sampling)"
    )
    usage: Usage
    model: str
    worker: str
    queue: str
    cache: Literal["hit", "miss"] | None = Field(
        default=None, description="hit: answered from the response cache; miss: generated and stored"
    )
    choices: list[ChoiceResult] | None = Field(default=None, description="Every choice, when `n` > 1")


class JobStatus(StrEnum):
    """Where a job is, as the API reports it."""

    QUEUED = "queued"
    HELD = "held"
    SCHEDULED = "scheduled"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL_STATUSES = frozenset(
    {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)
"""Statuses a job never leaves."""

Priority = Literal["high", "normal", "low", "batch"]
"""How soon a job is taken: the scheduler and the workers serve higher priorities first. `batch`,
the lowest, only the batch feeder gives (a batch's lines); no client may ask for it."""

SubmittedPriority = Literal["high", "normal", "low"]
"""The priorities a client may ask for."""


def refuse_batch_priority(value: object) -> object:
    """A before-validator of a client's `priority`: `batch` is refused with the reason (422)."""
    if value == "batch":
        raise ValueError("priority `batch` is reserved for the lines of a batch (POST /v1/batches)")
    return value


class JobSubmission(JobRequest):
    """`POST /v1/jobs`: a generation request and how the job should be run and reported."""

    priority: SubmittedPriority = Field(default="normal", description="high, normal or low")
    deadline: AwareDatetime | None = Field(
        default=None,
        description="Latest start (ISO 8601 with a time zone, or unix seconds as a number); not started "
        "by then: the job ends `expired`",
    )
    cancel_after: float | None = Field(
        default=None, gt=0, strict=True, allow_inf_nan=False,
        description="Seconds after submission by which the job must start",
    )  # fmt: skip
    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="https URL POSTed the job when it ends (Standard Webhooks signature)",
    )

    _no_batch_priority = field_validator("priority", mode="before")(refuse_batch_priority)

    @field_validator("deadline", mode="before")
    @classmethod
    def _deadline_not_numeric_text(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit():
            raise ValueError("unix seconds must be a JSON number, not a string")
        return value

    def request(self) -> JobRequest:
        """The generation request alone: what the scheduler counts and the worker runs."""
        return JobRequest.model_validate(self.model_dump(include=set(JobRequest.model_fields)))


class StageTimes(BaseModel):
    """Unix timestamps (seconds) at which a job reached each stage."""

    received: float | None = None
    scheduled: float | None = None
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None


class RouteTaken(BaseModel):
    """The scheduler's routing decision: the queue, a stable reason code, and what it was based on."""

    queue: str
    reason: str
    prompt_tokens: int
    threshold: int


class ErrorInfo(BaseModel):
    """Why a job failed or was rejected."""

    code: str
    message: str


class JobView(BaseModel):
    """A job as `GET /v1/jobs/<id>` shows it."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    route: RouteTaken | None = None
    timestamps: StageTimes
    result: JobResult | None = None
    error: ErrorInfo | None = None
    held: ErrorInfo | None = Field(default=None, description="Why the scheduler holds the job, while held")
    url: str
    trace_id: str | None = Field(default=None, description="The job's trace, across API, scheduler, worker")
    priority: Priority = "normal"
    deadline: float | None = Field(default=None, description="Unix time by which the job must start")


class JobList(BaseModel):
    """`GET /v1/jobs`: the caller's jobs, newest first, a page at a time."""

    object: Literal["list"] = "list"
    data: list[JobView]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
