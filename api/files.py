"""`/v1/files`: upload a batch file (JSONL, checked line by line as it streams in), list, read,
download and delete files; every file is its tenant's alone (another tenant's id answers 404)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Literal

import structlog
from flask import Blueprint, Response, jsonify, request

from api.services import services
from api.tenancy import current_tenant
from api.uploads import Ingested, Limits, ingest
from shared.batches.errors import FileNotFound, FileQuotaExceeded, InvalidFile, UnsupportedPurpose
from shared.batches.records import StoredFile, new_file_id
from shared.batches.store import RedisFileStore
from shared.connection import open_budget
from shared.errors import ValidationFailed

bp = Blueprint("files", __name__, url_prefix="/v1/files")
log = structlog.get_logger()

FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")
"""Shape of a file id we look up; anything else is unknown without touching Redis."""

FORM_OVERHEAD = 64 * 1024
"""Bytes of a multipart body beyond its file (boundaries, headers, the other fields)."""

EXPIRES_MIN, EXPIRES_MAX = 3600, 30 * 24 * 3600
"""Bounds of `expires_after[seconds]` (OpenAI's)."""

LIST_LIMIT_MAX = 10_000


def file_store() -> RedisFileStore:
    return RedisFileStore(services().redis)


@bp.post("")
def create() -> Response:
    """Upload a JSONL file of batch requests (`purpose=batch`): 400 listing the first bad lines, 413
    over the size limits, 429 over the tenant's file quota."""
    settings = services().settings
    request.max_content_length = settings.file_max_bytes + FORM_OVERHEAD  # before the form is parsed
    purpose = request.form.get("purpose")
    if purpose != "batch":
        raise UnsupportedPurpose(
            f"purpose `{purpose}` is not supported here: upload files with purpose `batch`."
            if purpose
            else "purpose is required (`batch`).",
            details=[{"loc": ["purpose"], "msg": "must be batch"}],
        )
    unknown = sorted(set(request.form) - {"purpose", "expires_after[anchor]", "expires_after[seconds]"})
    if unknown:
        raise ValidationFailed(f"Unknown field(s): {', '.join(unknown)}.")
    upload_file = request.files.get("file")
    if upload_file is None or len(request.files) != 1:
        raise ValidationFailed("Send exactly one file, as the multipart field `file`.")
    tenant, now = current_tenant(), int(time.time())
    store = file_store()
    _check_quota(store, tenant, request.content_length or 0, now)
    file = StoredFile(
        id=new_file_id(),
        tenant=tenant,
        purpose="batch",
        filename=_filename(upload_file.filename),
        created_at=now,
        expires_at=now + _lifetime(settings.file_ttl),
    )
    upload = store.begin(file, on_write=lambda: open_budget(settings.api_redis_budget))
    limits = Limits(
        line_bytes=settings.max_body_bytes, lines=settings.file_max_lines, bytes=settings.file_max_bytes
    )
    try:
        found = ingest(upload_file.stream, upload, limits)
        if found.error_count:
            raise _refusal(found)
        _check_quota(store, tenant, file.bytes, now)
        file.urls = sorted(found.urls)
        stored = upload.finish()
    except BaseException:
        upload.abort()
        raise
    log.info("file_uploaded", file_id=stored.id, bytes=stored.bytes, lines=stored.lines)
    return jsonify(stored.view().model_dump(mode="json"))


@bp.get("")
def index() -> Response:
    """The caller's files by created_at (`order`, newest first by default), `limit` per page after
    the id `after`, of one `purpose` if given."""
    given = request.args.get("limit", str(LIST_LIMIT_MAX))
    limit = int(given) if given.isascii() and given.isdigit() and len(given) <= 5 else 0
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise ValidationFailed(f"limit must be an integer from 1 to {LIST_LIMIT_MAX}.")
    given_order = request.args.get("order", "desc")
    if given_order not in ("asc", "desc"):
        raise ValidationFailed("order must be asc or desc.")
    order: Literal["asc", "desc"] = "asc" if given_order == "asc" else "desc"
    unknown = sorted(set(request.args) - {"limit", "order", "after", "purpose"})
    if unknown:
        raise ValidationFailed(f"Unknown parameter(s): {', '.join(unknown)}.")
    files, more = file_store().page(
        current_tenant(),
        limit,
        request.args.get("after"),
        order,
        request.args.get("purpose"),
    )
    data = [f.view().model_dump(mode="json") for f in files]
    return jsonify(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


@bp.get("/<file_id>")
def show(file_id: str) -> Response:
    """One of the caller's files."""
    return jsonify(find_file(file_id).view().model_dump(mode="json"))


@bp.get("/<file_id>/content")
def content(file_id: str) -> Response:
    """The file's lines, streamed a chunk at a time (JSONL)."""
    file = find_file(file_id)
    store = file_store()

    def lines() -> Iterator[str]:
        for line in store.iter_lines(file.tenant, file.id):
            yield line + "\n"

    return Response(
        lines(),
        mimetype="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{file.filename}"'},
    )


@bp.delete("/<file_id>")
def delete(file_id: str) -> Response:
    """Delete one of the caller's files (a batch running on it writes its remaining lines as errors)."""
    file = find_file(file_id)
    deleted = file_store().delete(file.tenant, file.id)
    log.info("file_deleted", file_id=file.id)
    return jsonify({"id": file.id, "object": "file", "deleted": deleted})


def find_file(file_id: str) -> StoredFile:
    """The caller's file `file_id` (404 if unknown, expired or another tenant's)."""
    file = file_store().get(current_tenant(), file_id) if FILE_ID.match(file_id) else None
    if file is None:
        raise FileNotFound(f"No file `{file_id}`.")
    return file


def _check_quota(store: RedisFileStore, tenant: str, adding: int, now: int) -> None:
    """429 when the tenant holds its quota of files, or `adding` bytes would go over its bytes."""
    settings = services().settings
    usage = store.usage(tenant)
    if usage.files < settings.tenant_files and usage.bytes + adding <= settings.tenant_file_bytes:
        return
    wait = max(1, (usage.next_expiry or now + 3600) - now)
    what = (
        f"{usage.files} files, the most it may hold"
        if usage.files >= settings.tenant_files
        else f"{usage.bytes} bytes of files; this one would go over {settings.tenant_file_bytes}"
    )
    raise FileQuotaExceeded(
        f"The tenant holds {what}. Delete files (DELETE /v1/files/<id>) or wait until one expires.",
        headers={"Retry-After": str(wait)},
    )


def _lifetime(default: int) -> int:
    """Seconds the upload lives: `expires_after` (anchored at created_at) or the server's default."""
    anchor, seconds = request.form.get("expires_after[anchor]"), request.form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return default
    if anchor != "created_at":
        raise ValidationFailed("expires_after[anchor] must be `created_at`.")
    if (
        seconds is None
        or not seconds.isascii()
        or not seconds.isdigit()
        or not (EXPIRES_MIN <= int(seconds) <= EXPIRES_MAX)
    ):
        raise ValidationFailed(
            f"expires_after[seconds] must be an integer from {EXPIRES_MIN} to {EXPIRES_MAX}."
        )
    return int(seconds)


def _filename(name: str | None) -> str:
    """The upload's name as given (printable, at most 255 characters), else `upload.jsonl`."""
    name = (name or "").strip()
    return name[:255] if name and name.isprintable() else "upload.jsonl"


def _refusal(found: Ingested) -> InvalidFile:
    first = found.errors[0]
    more = (
        f" ({found.error_count} lines in all; the first {len(found.errors)} listed)"
        if found.error_count > 1
        else ""
    )
    return InvalidFile(
        f"The file is not a batch file: line {first.line}: {first.message}{more}",
        details=[e.to_dict() for e in found.errors],
    )
