"""`/v1/batches`: run an uploaded file's requests as a batch of low-priority jobs (the scheduler's
feeder releases them a few at a time), read its progress, list batches, cancel one."""

from __future__ import annotations

import json
import re
import time
from typing import Literal

import structlog
from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field

from api.body import read_json
from api.files import file_store
from api.services import services
from api.submission import webhooks
from api.tenancy import current_tenant
from shared.batches.errors import BatchEnded, BatchNotFound, BatchQuotaExceeded, FileNotFound
from shared.batches.ledger import BatchLedger
from shared.batches.lines import BATCH_URLS
from shared.batches.records import (
    COMPLETION_WINDOW,
    COMPLETION_WINDOW_SECONDS,
    StoredBatch,
    new_batch_id,
    new_file_id,
)
from shared.errors import ValidationFailed
from shared.json_body import parse_body
from shared.tracing import current_carrier

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
log = structlog.get_logger()

BATCH_ID = re.compile(r"^batch_[A-Za-z0-9_-]{1,64}$")
"""Shape of a batch id we look up; anything else is unknown without touching Redis."""

LIST_LIMIT, LIST_LIMIT_MAX = 20, 100

QUOTA_RETRY_AFTER = "60"
"""Seconds a tenant at its batch quota is told to wait (batches end as their lines run)."""


class OutputExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 24 * 3600, strict=True)


class BatchCreate(BaseModel):
    """`POST /v1/batches`."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=128)
    endpoint: str = Field(max_length=128)
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: OutputExpiresAfter | None = None
    webhook: str | None = Field(
        default=None, max_length=2048, description="Extension: https URL told when the batch ends"
    )


@bp.post("")
def create() -> Response:
    """Create a batch of the input file's requests: `validating` at once, then `in_progress`."""
    params = parse_body(read_json(), BatchCreate)
    if params.endpoint not in BATCH_URLS:
        raise ValidationFailed(
            f"endpoint `{params.endpoint}` is not supported: a batch may call {', '.join(BATCH_URLS)}.",
            details=[{"loc": ["endpoint"], "msg": "unsupported endpoint"}],
        )
    for key, value in (params.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise ValidationFailed("metadata keys have at most 64 characters, values at most 512.")
    if params.webhook is not None:
        webhooks().check(params.webhook)
    tenant, settings = current_tenant(), services().settings
    file = file_store().get(tenant, params.input_file_id)
    if file is None:
        raise FileNotFound(f"No file `{params.input_file_id}`.")
    if file.purpose != "batch":
        raise ValidationFailed(
            f"The file `{file.id}` has purpose `{file.purpose}`; a batch reads a `batch` file."
        )
    ledger = BatchLedger(services().redis)
    if ledger.active_count(tenant) >= settings.tenant_batches:
        raise BatchQuotaExceeded(
            f"The tenant has {settings.tenant_batches} batches at work, the most it may; wait for one to "
            "end or cancel one.",
            headers={"Retry-After": QUOTA_RETRY_AFTER},
        )
    now = int(time.time())
    carrier = current_carrier()  # the feeder's spans, and each line's job, continue this request's trace
    batch = StoredBatch(
        id=new_batch_id(), tenant=tenant, endpoint=params.endpoint, input_file_id=file.id,
        status="validating", created_at=now, expires_at=now + COMPLETION_WINDOW_SECONDS,
        output_file_id=new_file_id(), error_file_id=new_file_id(),
        output_ttl=params.output_expires_after.seconds if params.output_expires_after else settings.batch_ttl,
        metadata=json.dumps(params.metadata) if params.metadata is not None else None,
        webhook=params.webhook, model=settings.model, request_id=g.get("request_id"),
        traceparent=carrier.get("traceparent"), tracestate=carrier.get("tracestate"),
    )  # fmt: skip
    ledger.create(batch, settings.batch_ttl)
    structlog.contextvars.bind_contextvars(batch_id=batch.id)
    log.info("batch_created", input_file_id=file.id, endpoint=batch.endpoint, window=COMPLETION_WINDOW)
    return jsonify(batch.view().model_dump(mode="json"))


@bp.get("")
def index() -> Response:
    """The caller's batches, newest first: `limit` per page, the next page `after` the last id."""
    given = request.args.get("limit", str(LIST_LIMIT))
    limit = int(given) if given.isascii() and given.isdigit() and len(given) <= 3 else 0
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise ValidationFailed(f"limit must be an integer from 1 to {LIST_LIMIT_MAX}.")
    after = request.args.get("after")
    if after is not None and not BATCH_ID.match(after):
        raise ValidationFailed("after must be a batch id from an earlier page.")
    batches, more = BatchLedger(services().redis).page(current_tenant(), limit, after)
    data = [b.view().model_dump(mode="json") for b in batches]
    return jsonify({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": more})  # fmt: skip


@bp.get("/<batch_id>")
def show(batch_id: str) -> Response:
    """One of the caller's batches, with its progress."""
    return jsonify(find_batch(batch_id).view().model_dump(mode="json"))


@bp.post("/<batch_id>/cancel")
def cancel(batch_id: str) -> Response:
    """Cancel a batch: it releases no more lines, its waiting and running jobs are cancelled, and it
    ends `cancelled` once they have (`cancelling` until then). An ended batch answers 409."""
    batch = find_batch(batch_id)
    ledger = BatchLedger(services().redis)
    if batch.status in ("completed", "failed", "expired"):
        raise BatchEnded(
            f"The batch `{batch.id}` already ended `{batch.status}`; there is nothing to cancel."
        )
    if ledger.advance(batch, ("validating", "in_progress"), "cancelling", int(time.time())):
        log.info("batch_cancel_requested", batch_id=batch.id)
    return jsonify(find_batch(batch_id).view().model_dump(mode="json"))


def find_batch(batch_id: str) -> StoredBatch:
    """The caller's batch `batch_id` (404 if unknown, expired or another tenant's)."""
    batch = (
        BatchLedger(services().redis).get(current_tenant(), batch_id) if BATCH_ID.match(batch_id) else None
    )
    if batch is None:
        raise BatchNotFound(f"No batch `{batch_id}`.")
    return batch
