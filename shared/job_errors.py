"""The error a request answers with when its job ended without a result: one mapping from the job's
error code to an HTTP status, for the OpenAI endpoints and a batch line's error file alike."""

from __future__ import annotations

from shared.contract import JobStatus, JobView
from shared.errors import GptossError
from shared.jobstore import events

ERROR_STATUS = {
    "prompt_too_long": 413,
    "job_cancelled": 409,
    "deadline_exceeded": 504,
    "hold_expired": 503,
    "job_expired": 410,
    events.DIVERGED: 502,
}
"""HTTP status of a job that ended without a result, by its error code (else 500 or 503)."""


def job_error(code: str, message: str, view: JobView | None = None) -> GptossError:
    """The error answering a request whose job ended without a result."""
    error = GptossError(message)
    rejected = view is not None and view.status is JobStatus.REJECTED
    error.code = code
    error.status = ERROR_STATUS.get(code, 503 if rejected else 500)
    error.kind = "invalid_request_error" if error.status < 500 else "server_error"
    return error
