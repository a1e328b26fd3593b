"""A batch line's body read and its answer written exactly as the endpoint it names would: the same
request models (`shared.openai.models`) and the same response builders, used by the scheduler's batch
feeder."""

from __future__ import annotations

from typing import Any

from shared.batches.lines import CHAT_URL, COMPLETIONS_URL
from shared.contract import JobResult, JobSubmission
from shared.errors import UnsupportedParameter, ValidationFailed
from shared.job_errors import job_error
from shared.json_body import parse_body
from shared.openai.models import ChatCompletionRequest, CompletionRequest, chat_completion, text_completion


def line_submission(url: str, body: Any) -> JobSubmission:
    """The job a batch line's `body` for endpoint `url` runs as (its errors the endpoint's own: 422
    for invalid or unsupported fields)."""
    if url == CHAT_URL:
        params: ChatCompletionRequest | CompletionRequest = parse_body(body, ChatCompletionRequest)
    elif url == COMPLETIONS_URL:
        params = parse_body(body, CompletionRequest)
    else:
        raise ValidationFailed(f"A batch cannot call `{url}`.")
    if params.stream:
        raise UnsupportedParameter(
            "`stream` is not supported in a batch: each answer goes to the output file."
        )
    return params.submission()


def line_answer(url: str, job_id: str, created: int, result: JobResult) -> dict[str, Any]:
    """The body the endpoint answers a finished job with (chat.completion or text_completion)."""
    chat = url == CHAT_URL
    answer = (chat_completion if chat else text_completion)(job_id, created, result)
    return answer.model_dump(mode="json", exclude_none=not chat)


def line_error(code: str, message: str, rejected: bool = False) -> tuple[int, dict[str, Any]]:
    """The status and body the endpoint answers when a job ended without a result."""
    error = job_error(code, message)
    if rejected and error.status == 500:
        error.status, error.kind = 503, "server_error"
    return error.status, error.to_dict()
