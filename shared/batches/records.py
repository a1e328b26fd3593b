"""What a file and a batch are, as clients see them (OpenAI's FileObject and Batch) and as Redis
keeps them (flat hashes, so one Lua script can move a count or a status without parsing JSON)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel

FILE_ID_PREFIX = "file-"
BATCH_ID_PREFIX = "batch_"

FilePurpose = Literal["batch", "batch_output"]
FileStatus = Literal["uploaded", "processed", "error"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]

BATCH_ENDED: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
"""Statuses after which nothing about a batch changes."""

COMPLETION_WINDOW = "24h"
"""The one completion window (OpenAI's only one too)."""

COMPLETION_WINDOW_SECONDS = 24 * 3600


def new_file_id() -> str:
    return FILE_ID_PREFIX + uuid.uuid4().hex


def new_batch_id() -> str:
    return BATCH_ID_PREFIX + uuid.uuid4().hex


class FileObject(BaseModel):
    """OpenAI's `file` object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    status: FileStatus
    status_details: str | None = None


class StoredFile(BaseModel):
    """A file's hash in Redis: its FileObject's fields, its line count and (input files) the urls
    its lines call."""

    id: str
    tenant: str
    purpose: FilePurpose
    filename: str
    created_at: int
    expires_at: int | None = None
    status: FileStatus = "processed"
    bytes: int = 0
    lines: int = 0
    urls: list[str] = []

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> StoredFile:
        fields: dict[str, Any] = {text_of(k): text_of(v) for k, v in raw.items()}
        fields["urls"] = json.loads(fields.get("urls") or "[]")
        fields["expires_at"] = fields.get("expires_at") or None
        return cls.model_validate(fields)

    def to_hash(self) -> dict[str, str | int]:
        fields = self.model_dump(exclude_none=True)
        fields["urls"] = json.dumps(self.urls)
        return fields

    def view(self) -> FileObject:
        return FileObject(
            id=self.id,
            bytes=self.bytes,
            created_at=self.created_at,
            expires_at=self.expires_at,
            filename=self.filename,
            purpose=self.purpose,
            status=self.status,
        )


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchErrorEntry(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorEntry]


class BatchObject(BaseModel):
    """OpenAI's `batch` object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = COMPLETION_WINDOW
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None


TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
"""The Batch fields that say when it reached a status."""


class StoredBatch(BaseModel):
    """A batch's hash in Redis: its Batch fields flat, the feeder's cursor (lines claimed so far),
    the ids its output and error files will have, and what its jobs carry on (trace, webhook)."""

    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    status: BatchStatus
    created_at: int
    expires_at: int
    output_file_id: str
    error_file_id: str
    output_ttl: int
    """Seconds the output and error files live from their creation."""
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    cursor: int = 0
    """Input lines claimed by the feeder (released, refused or expired), from the first."""
    outputs: int = 0
    """Lines written to the output file."""
    errors_written: int = 0
    """Lines written to the error file."""
    stop: str = ""
    """Why a running batch releases no more lines (`expire`), or ''."""
    errors: str | None = None
    """JSON of the BatchErrors of a batch that failed validation."""
    metadata: str | None = None
    webhook: str | None = None
    model: str | None = None
    request_id: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> StoredBatch:
        return cls.model_validate({text_of(k): text_of(v) for k, v in raw.items()})

    def to_hash(self) -> dict[str, str | int]:
        return self.model_dump(exclude_none=True)

    @property
    def ended(self) -> bool:
        return self.status in BATCH_ENDED

    def view(self) -> BatchObject:
        """The Batch a client sees: the output and error files named once they hold a line."""
        stamps = {name: getattr(self, name) for name in TIMESTAMPS}
        return BatchObject(
            id=self.id,
            endpoint=self.endpoint,
            input_file_id=self.input_file_id,
            status=self.status,
            created_at=self.created_at,
            expires_at=self.expires_at,
            model=self.model,
            errors=BatchErrors.model_validate_json(self.errors) if self.errors else None,
            output_file_id=self.output_file_id if self.outputs else None,
            error_file_id=self.error_file_id if self.errors_written else None,
            request_counts=RequestCounts(total=self.total, completed=self.completed, failed=self.failed),
            metadata=json.loads(self.metadata) if self.metadata else None,
            **stamps,
        )


def text_of(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
