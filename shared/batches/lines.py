"""The lines of batch files: what an input line must be (checked line by line as it is uploaded),
and the output and error lines a batch writes, in OpenAI's shapes. Pure functions."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

BATCH_URLS = (CHAT_URL, COMPLETIONS_URL)
"""The endpoints a batch line may call (one per batch)."""

MAX_CUSTOM_ID_CHARS = 512
"""Longest `custom_id` of a line."""

MAX_ERRORS_LISTED = 20
"""Line errors a refused upload lists (the first ones); the count says how many there were."""

REQUEST_ID_PREFIX = "batch_req_"
"""The id of one line's request in the output and error files (OpenAI's prefix)."""


@dataclass(frozen=True)
class LineError:
    """Why one line of an upload is refused (`line` counts from 1, as editors do)."""

    line: int
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class InputLine:
    """The fields of a valid input line the batch needs without parsing it again."""

    custom_id: str
    url: str


def check_line(number: int, parsed: Any, seen: set[str]) -> InputLine | LineError:
    """Line `number`, already parsed as JSON, as a batch input line, or why it is not one; `seen`
    holds the custom_ids of the lines before it (the line's own is added when it is valid)."""
    if not isinstance(parsed, dict):
        return LineError(number, "invalid_line", "The line must be a JSON object.")
    unknown = sorted(set(parsed) - {"custom_id", "method", "url", "body"})
    if unknown:
        return LineError(number, "invalid_line", f"Unknown field(s) {', '.join(map(repr, unknown))}.")
    custom_id = parsed.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "missing_custom_id", "`custom_id` must be a non-empty string.")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return LineError(
            number, "invalid_custom_id", f"`custom_id` is over {MAX_CUSTOM_ID_CHARS} characters."
        )
    if custom_id in seen:
        return LineError(number, "duplicate_custom_id", f"The custom_id {custom_id!r} is used twice.")
    if parsed.get("method") != "POST":
        return LineError(number, "invalid_method", '`method` must be "POST".')
    url = parsed.get("url")
    if url not in BATCH_URLS:
        return LineError(number, "invalid_url", f"`url` must be one of {', '.join(BATCH_URLS)}.")
    if not isinstance(parsed.get("body"), dict):
        return LineError(number, "invalid_body", "`body` must be a JSON object.")
    seen.add(custom_id)
    return InputLine(custom_id, url)


def request_id() -> str:
    """A new id of one line's request."""
    return REQUEST_ID_PREFIX + uuid.uuid4().hex


def output_line(custom_id: str, job_id: str, body: dict[str, Any]) -> str:
    """The output file's line of a request that answered (`body`: the endpoint's answer)."""
    response = {"status_code": 200, "request_id": job_id, "body": body}
    return _line({"id": request_id(), "custom_id": custom_id, "response": response, "error": None})


def failed_line(custom_id: str, job_id: str | None, status: int, error: dict[str, Any]) -> str:
    """The error file's line of a request refused (`job_id` None: it never became a job) or whose job
    ended without an answer; `status` and `error` are what the endpoint would have answered."""
    response = {"status_code": status, "request_id": job_id, "body": error}
    return _line({"id": request_id(), "custom_id": custom_id, "response": response, "error": None})


def unrun_line(custom_id: str, code: str, message: str) -> str:
    """The error file's line of a request the batch did not let finish: never released before it
    expired, or stopped by its expiry or cancellation (OpenAI's `error` form, no response)."""
    return _line({"id": request_id(), "custom_id": custom_id, "response": None,
                  "error": {"code": code, "message": message}})  # fmt: skip


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
