"""The Responses API's wire format: the request (`POST /v1/responses`) and the Response object, with
pure conversions from the job contract (a job's view and result) to it. Unknown fields are
`extra_forbid`; parameters this server does not implement are accepted only at their defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.responses_input import (
    FunctionTool,
    InputItem,
    ReasoningConfig,
    ResponsesToolChoice,
    TextConfig,
    contract_choice,
    conversation,
    item_list,
    tool_list,
)
from shared.contract import (
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    ChatMessage,
    JobResult,
    JobStatus,
    JobSubmission,
    JobView,
    Usage,
)
from shared.errors import GptossError, ValidationFailed
from shared.json_body import invalid_fields
from shared.openai.params import Defaults, refuse_unsupported
from shared.tools import MAX_TOOLS

RESPONSES_UNSUPPORTED: dict[str, Defaults] = {
    "include": ([],),
    "truncation": ("disabled",),
    "conversation": (),
    "prompt": (),
    "max_tool_calls": (),
    "top_logprobs": (0,),
    "service_tier": ("auto", "default"),
    "context_management": (),
    "moderation": (),
    "prompt_cache_retention": ("in_memory",),
    "stream_options": ({"include_obfuscation": False},),
}
"""What `POST /v1/responses` refuses beyond its defaults (`include` values need outputs this server
does not make: encrypted reasoning, hosted tools' results, logprobs of the Responses shape)."""

MAX_METADATA_KEYS = 16
"""OpenAI's limit on `metadata` pairs (keys up to 64 characters, values up to 512)."""


class ResponseNotFound(GptossError):
    """An unknown id, another tenant's, one stored with `store: false`, or one deleted."""

    code, status, kind = "response_not_found", 404, "invalid_request_error"


class ResponseRequestError(GptossError):
    """A request OpenAI answers 400: background without store, cancelling a response that is not
    background, continuing one that has not finished."""

    code, status, kind = "invalid_request", 400, "invalid_request_error"


class ResponseRequest(BaseModel):
    """`POST /v1/responses`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    input: str | list[InputItem] = Field(max_length=MAX_TEXT_CHARS)
    instructions: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = Field(default=None, strict=True)
    text: TextConfig | None = None
    previous_response_id: str | None = Field(default=None, max_length=128)
    store: bool = Field(default=True, strict=True)
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA_KEYS)
    background: bool = Field(default=False, strict=True)
    stream: bool = Field(default=False, strict=True)
    user: str | None = Field(default=None, max_length=256, description="The end user (echoed, not used)")
    safety_identifier: str | None = Field(default=None, max_length=64, description="Echoed, not used")
    prompt_cache_key: str | None = Field(
        default=None, max_length=256, description="Echoed: a chain's turns reuse their KV on their own"
    )

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, data: object) -> object:
        return refuse_unsupported(data, RESPONSES_UNSUPPORTED)

    @field_validator("input", mode="before")
    @classmethod
    def _typed_items(cls, value: object) -> object:
        return item_list(value) if isinstance(value, list) else value

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, value: object) -> object:
        return tool_list(value) if isinstance(value, list) else value

    @field_validator("metadata")
    @classmethod
    def _metadata_fits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("metadata keys hold at most 64 characters, values at most 512")
        return value

    @model_validator(mode="after")
    def _background_is_stored(self) -> ResponseRequest:
        if self.background and not self.store:
            raise ResponseRequestError("A background response must be stored: send `store: true` with it.")
        return self

    def new_messages(self) -> list[ChatMessage]:
        """This request's input as the contract's messages."""
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        try:
            return conversation(self.input)
        except ValueError as exc:  # the contract's own checks (tool fields that fit the role)
            raise ValidationFailed(f"An input item has invalid fields: {exc}") from None

    def submission(self, history: list[ChatMessage], session_id: str | None) -> JobSubmission:
        """The job this request runs as: the instructions, then `history` (earlier turns and this
        request's input), continuing the KV cache of `session_id`."""
        instructions = [ChatMessage(role="developer", content=self.instructions)] if self.instructions else []
        fields: dict[str, Any] = {}
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            fields = {"tools": [t.contract() for t in self.tools or []] or None,
                      "tool_choice": contract_choice(self.tool_choice),
                      "parallel_tool_calls": self.parallel_tool_calls}  # fmt: skip
        if self.text is not None:
            fields["response_format"] = self.text.format.contract()
        effort = self.reasoning.contract_effort() if self.reasoning is not None else None
        try:
            return JobSubmission(
                model=self.model, messages=[*instructions, *history], max_tokens=self.max_output_tokens,
                temperature=self.temperature, top_p=self.top_p, reasoning_effort=effort,
                session_id=session_id, **fields,
            )  # fmt: skip
        except ValueError as exc:  # the job contract's own checks
            raise invalid_fields(exc) from None

    def echo(self) -> dict[str, Any]:
        """What a Response repeats of its request (OpenAI's defaults where it gave none)."""
        text = self.text or TextConfig()
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": self.reasoning.effort if self.reasoning else None, "summary": None},
            "store": self.store,
            "background": self.background,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "text": {"format": text.format.model_dump(mode="json", by_alias=True, exclude_none=True)},
            "tool_choice": self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel)
            else self.tool_choice or "auto",
            "tools": [t.model_dump(mode="json") for t in self.tools or []],
            "truncation": "disabled",
            "user": self.user,
            "safety_identifier": self.safety_identifier,
            "prompt_cache_key": self.prompt_cache_key,
        }  # fmt: skip


class ResponseHead(BaseModel):
    """What a Response holds from its creation on: its id, creation time, model and request echo."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]


Status = Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]

STATUS_OF_JOB: dict[JobStatus, Status] = {
    JobStatus.QUEUED: "queued",
    JobStatus.HELD: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.STARTED: "in_progress",
    JobStatus.CANCELLING: "in_progress",
    JobStatus.FINISHED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.REJECTED: "failed",
    JobStatus.EXPIRED: "failed",
    JobStatus.CANCELLED: "cancelled",
}
"""A Response's status for its job's (a finished job cut at max_output_tokens is `incomplete`)."""

CANCELLED_CODE = "job_cancelled"

OPENAI_ERROR_CODES = {"prompt_too_long": "invalid_prompt", "rate_limited": "rate_limit_exceeded"}
"""OpenAI's error code of a failed response by the job's error code (else `server_error`)."""


def response_error(code: str, message: str) -> dict[str, str]:
    """A failed response's `error`: OpenAI's code, and the job's own stable code as its `type`."""
    return {"code": OPENAI_ERROR_CODES.get(code, "server_error"), "message": message, "type": code}


def response_object(
    head: ResponseHead,
    status: Status,
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
    completed_at: float | None = None,
) -> dict[str, Any]:
    """A Response object, as OpenAI's JSON."""
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": head.id, "object": "response", "created_at": head.created_at, "status": status,
        "completed_at": int(completed_at) if completed_at and status == "completed" else None,
        "error": error, "incomplete_details": incomplete, "model": head.model, "output": output or [],
        "usage": usage, "service_tier": "default", **head.echo,
    }  # fmt: skip


def view_response(head: ResponseHead, view: JobView, count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """The Response of a job as it stands (`count_tokens` counts its reasoning's tokens, for usage)."""
    status = STATUS_OF_JOB[view.status]
    if view.status is JobStatus.FINISHED and view.result is not None:
        result = view.result
        return finished_response(head, result, count_tokens(result.reasoning or ""), view.timestamps.finished)
    error = response_error(view.error.code, view.error.message) if view.error is not None else None
    return response_object(head, status, error=error if status == "failed" else None)


def finished_response(
    head: ResponseHead, result: JobResult, reasoning_tokens: int, finished: float | None
) -> dict[str, Any]:
    """The Response of a finished job: `incomplete` when cut at max_output_tokens."""
    status: Status = "incomplete" if result.finish_reason == "length" else "completed"
    output = result_output(head.id, result, status)
    return response_object(
        head, status, output, usage_of(result.usage, reasoning_tokens), completed_at=finished
    )


def result_output(response_id: str, result: JobResult, status: str = "completed") -> list[dict[str, Any]]:
    """A finished job's output items: its reasoning, its answer, its function calls."""
    item_status = "incomplete" if status == "incomplete" else "completed"
    output: list[dict[str, Any]] = []
    if result.reasoning:
        output.append(reasoning_item(item_id(response_id, "reasoning", len(output)), result.reasoning))
    if result.text:
        output.append(message_item(item_id(response_id, "message", len(output)), result.text, item_status))
    for call in result.tool_calls or []:
        fc = item_id(response_id, "function_call", len(output))
        output.append(call_item(fc, call.id, call.function.name, call.function.arguments))
    return output


ITEM_PREFIX = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


def item_id(response_id: str, kind: str, index: int) -> str:
    """The id of output item `index` (the same in a stream and in every later read of the response)."""
    return f"{ITEM_PREFIX[kind]}_{response_id}_{index}"


def reasoning_item(item: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}  # fmt: skip


def message_item(item: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [output_text(text)]
    return {"type": "message", "id": item, "role": "assistant", "status": status, "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(
    item: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {"type": "function_call", "id": item, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip


def usage_of(usage: Usage, reasoning_tokens: int) -> dict[str, Any]:
    """A job's usage in the Responses shape (cached tokens: those a session's KV served)."""
    details = usage.prompt_tokens_details
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": details.cached_tokens if details else 0,
            "cache_write_tokens": 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)},
        "total_tokens": usage.total_tokens,
    }


def answer_messages(result: JobResult) -> list[ChatMessage]:
    """A finished job's answer as the conversation's next messages (what `previous_response_id`
    continues from): the reasoning is kept only before function calls, as harmony keeps it."""
    if result.tool_calls:
        return [ChatMessage(role="assistant", content=result.text, tool_calls=result.tool_calls,
                            reasoning_content=result.reasoning or None)]  # fmt: skip
    return [ChatMessage(role="assistant", content=result.text)]
