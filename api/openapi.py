"""`GET /openapi.json`: the OpenAPI 3.1 document of this API, generated from the pydantic models of
the requests and responses and one table of operations (tests check the table against Flask's
routes, both ways)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.batches import BatchCreate
from api.responses_types import ResponseRequest
from shared.batches.records import BatchObject, FileObject
from shared.contract import JobList, JobStatus, JobSubmission, JobView
from shared.openai.models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    TextCompletion,
)

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    code: str
    type: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """Every error: a stable `code`, OpenAI's `type`, a message to act on."""

    error: ErrorBody


class JobAccepted(BaseModel):
    """`POST /v1/jobs`: the new job and where to poll it."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    url: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    reasons: list[str]
    workers: dict[str, int] = {}
    schedulers: int = 0


ERRORS = {
    400: "The body is not JSON: invalid_json, invalid_encoding (not UTF-8), json_too_deep (over 64 levels), "
    "non_finite_number (NaN, Infinity), duplicate_key; invalid_file (a batch upload's bad lines, numbered)",
    401: "No valid API key (when keys are required)",
    403: "Admin endpoints are off",
    404: "Unknown job, response, file, batch, route or model",
    409: "Idempotency-Key reused with another body, or the job already ended",
    410: "The job expired (past its retention)",
    413: "Body or prompt too large",
    422: "Invalid fields: validation_error (details per field; unknown fields are extra_forbidden), "
    "lone_surrogate, unsupported_parameter (an OpenAI parameter set beyond its default); tool calls: "
    "invalid_tool_schema, duplicate_tool_name, unknown_tool_choice, unknown_tool_call_id, tools_unsupported "
    "(the model's chat format cannot call tools)",
    429: "Backlog full, rate limited (see Retry-After), or a file or batch quota reached",
    500: "The job failed",
    503: "Job store unreachable, admission busy, or the job was rejected",
    504: "The job's deadline passed before it started",
}

JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
LIST_PAGE = (
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {"name": "after", "in": "query", "schema": {"type": "string"}},
)
RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}


@dataclass(frozen=True)
class Operation:
    """One method on one path: what it takes, what it answers."""

    method: str
    path: str
    summary: str
    body: type[BaseModel] | None = None
    ok: dict[int, Any] = field(default_factory=dict)  # status -> model, or (media type, model|None)
    errors: tuple[int, ...] = ()
    parameters: tuple[dict[str, Any], ...] = ()
    admin: bool = False


SUBMIT_ERRORS = (400, 401, 404, 409, 413, 422, 429, 503)
SYNC_ERRORS = (*SUBMIT_ERRORS, 410, 500, 504)

OPERATIONS = (
    Operation("get", "/healthz", "The process is up", ok={200: Health}),
    Operation("get", "/readyz", "Ready to serve", ok={200: Readiness, 503: Readiness}),
    Operation("get", "/metrics", "Prometheus metrics", ok={200: ("text/plain", None)}, errors=(401,)),
    Operation("get", "/openapi.json", "This document", ok={200: ("application/json", None)}),
    Operation(
        "post", "/v1/jobs", "Submit a job", body=JobSubmission, ok={202: JobAccepted, 200: JobView},
        errors=SUBMIT_ERRORS,
        parameters=({"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},),
    ),
    Operation(
        "get", "/v1/jobs", "Your recent jobs, newest first", ok={200: JobList}, errors=(401, 422),
        parameters=(
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
            {"name": "after", "in": "query", "schema": {"type": "string"}},
        ),
    ),
    Operation(
        "get", "/v1/jobs/{job_id}", "A job", ok={200: JobView}, errors=(401, 404, 410), parameters=(JOB_ID,)
    ),
    Operation(
        "delete", "/v1/jobs/{job_id}", "Cancel a job", ok={200: JobView, 202: JobView},
        errors=(401, 404, 409, 410), parameters=(JOB_ID,),
    ),
    Operation(
        "get", "/v1/jobs/{job_id}/events", "The job's events (Server-Sent Events)",
        ok={200: ("text/event-stream", None)}, errors=(401, 404, 410, 422),
        parameters=(
            JOB_ID,
            {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
            {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
        ),
    ),
    Operation(
        "post", "/v1/chat/completions", "OpenAI chat completion, tool calls too (stream: Server-Sent chunks)",
        body=ChatCompletionRequest, ok={200: (ChatCompletion, ChatCompletionChunk)}, errors=SYNC_ERRORS,
    ),
    Operation(
        "post", "/v1/completions", "OpenAI text completion (stream: Server-Sent chunks)",
        body=CompletionRequest, ok={200: (TextCompletion, TextCompletion)}, errors=SYNC_ERRORS,
    ),
    Operation(
        "post", "/v1/responses", "OpenAI Response (stream: Server-Sent events; background: answered at once)",
        body=ResponseRequest, ok={200: ("application/json", None)}, errors=(*SYNC_ERRORS, 400),
        parameters=({"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},),
    ),
    Operation(
        "get", "/v1/responses/{response_id}", "A response; stream=true: its events after starting_after",
        ok={200: ("application/json", None)}, errors=(401, 404, 410, 422, 429),
        parameters=(RESPONSE_ID, {"name": "stream", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "starting_after", "in": "query", "schema": {"type": "integer", "minimum": 0}}),
    ),
    Operation(
        "post", "/v1/responses/{response_id}/cancel", "Cancel a background response",
        ok={200: ("application/json", None)}, errors=(400, 401, 404, 409, 410), parameters=(RESPONSE_ID,),
    ),
    Operation(
        "delete", "/v1/responses/{response_id}", "Forget a stored response",
        ok={200: ("application/json", None)}, errors=(401, 404), parameters=(RESPONSE_ID,),
    ),
    Operation(
        "get", "/v1/responses/{response_id}/input_items", "A response's input items",
        ok={200: ("application/json", None)}, errors=(401, 404, 422), parameters=(RESPONSE_ID,),
    ),
    Operation("get", "/v1/models", "The served model", ok={200: ModelList}, errors=(401,)),
    Operation(
        "get", "/v1/models/{model}", "One served model", ok={200: ModelCard}, errors=(401, 404),
        parameters=({"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},),
    ),
    Operation(
        "post", "/v1/files", "Upload a JSONL batch file (multipart: file, purpose=batch, "
        "expires_after[anchor], expires_after[seconds]); bad lines are refused, numbered",
        ok={200: FileObject}, errors=(400, 401, 413, 422, 429),
    ),
    Operation("get", "/v1/files", "Your files", ok={200: ("application/json", None)}, errors=(401, 422),
              parameters=LIST_PAGE),
    Operation("get", "/v1/files/{file_id}", "A file", ok={200: FileObject}, errors=(401, 404),
              parameters=(FILE_ID,)),
    Operation("delete", "/v1/files/{file_id}", "Delete a file", ok={200: ("application/json", None)},
              errors=(401, 404), parameters=(FILE_ID,)),
    Operation("get", "/v1/files/{file_id}/content", "A file's lines (JSONL)",
              ok={200: ("application/jsonl", None)}, errors=(401, 404), parameters=(FILE_ID,)),
    Operation("post", "/v1/batches", "Run a file's requests as a batch", body=BatchCreate,
              ok={200: BatchObject}, errors=(400, 401, 404, 422, 429)),
    Operation("get", "/v1/batches", "Your batches, newest first", ok={200: ("application/json", None)},
              errors=(401, 422), parameters=LIST_PAGE),
    Operation("get", "/v1/batches/{batch_id}", "A batch", ok={200: BatchObject}, errors=(401, 404),
              parameters=(BATCH_ID,)),
    Operation("post", "/v1/batches/{batch_id}/cancel", "Cancel a batch", ok={200: BatchObject},
              errors=(401, 404, 409), parameters=(BATCH_ID,)),
    Operation("get", "/admin/capacity", "Workers, queues, held jobs", ok={200: ("application/json", None)},
              errors=(401, 403), admin=True),
    Operation("get", "/admin/debug-bundle", "Diagnostics archive", ok={200: ("application/gzip", None)},
              errors=(401, 403), admin=True),
)  # fmt: skip
"""Every operation of the API (rq-dashboard's pages under /admin/rq are not part of it)."""


def _models() -> list[tuple[type[BaseModel], Literal["validation", "serialization"]]]:
    found: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorResponse, "serialization")
    ]
    for op in OPERATIONS:
        if op.body is not None:
            found.append((op.body, "validation"))
        for answer in op.ok.values():
            for item in answer if isinstance(answer, tuple) else (answer,):
                if isinstance(item, type) and issubclass(item, BaseModel):
                    found.append((item, "serialization"))
    return list(dict.fromkeys(found))


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    refs, schemas = models_json_schema(_models(), ref_template=REF)

    def ref(model: type[BaseModel], mode: str = "serialization") -> dict[str, Any]:
        return refs[(model, mode)]  # type: ignore[index]

    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {}
        for status, answer in op.ok.items():
            responses[str(status)] = {"description": "OK", "content": _content(answer, ref)}
        for status in op.errors:
            responses[str(status)] = {
                "description": ERRORS[status],
                "content": {"application/json": {"schema": ref(ErrorResponse)}},
            }
        entry: dict[str, Any] = {"summary": op.summary, "responses": responses}
        if op.parameters:
            entry["parameters"] = list(op.parameters)
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.body, "validation")}},
            }
        entry["security"] = [{"bearer": []}] if op.admin or op.path.startswith("/v1/") else []
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpt-oss-hf-server", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _content(answer: Any, ref: Any) -> dict[str, Any]:
    if isinstance(answer, tuple) and isinstance(answer[0], str):
        media, model = answer
        return {media: {"schema": ref(model)} if model is not None else {}}
    if isinstance(answer, tuple):  # (JSON answer, streamed chunk)
        whole, chunk = answer
        return {"application/json": {"schema": ref(whole)}, "text/event-stream": {"schema": ref(chunk)}}
    return {"application/json": {"schema": ref(answer)}}


@bp.get("/openapi.json")
def openapi() -> Response:
    """This API's OpenAPI document."""
    return jsonify(document())
