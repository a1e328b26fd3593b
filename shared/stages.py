"""Names of the job.meta fields every process reads or writes, and the status a client sees."""

from __future__ import annotations

from typing import Any

from shared.contract import JobStatus

META_REQUEST_ID = "request_id"
META_MODEL = "model"
META_TIMESTAMPS = "timestamps"
META_ROUTE = "route"
META_ERROR = "error"
META_REJECTED = "rejected"
META_HELD = "held"
META_PROMPT_TOKENS = "prompt_tokens"
META_TENANT = "tenant"
META_PRIORITY = "priority"
META_DEADLINE = "deadline"
META_WEBHOOK = "webhook"
META_RETENTION = "retention"
META_CANCELLED = "cancelled"
META_EXPIRED = "expired"
META_CACHE_KEY = "cache_key"

STAGE_RECEIVED = "received"
STAGE_SCHEDULED = "scheduled"
STAGE_STARTED = "started"
STAGE_FIRST_TOKEN = "first_token"
STAGE_FINISHED = "finished"

_RQ_TERMINAL = {
    "finished": JobStatus.FINISHED,
    "failed": JobStatus.FAILED,
    "stopped": JobStatus.FAILED,
    "canceled": JobStatus.CANCELLED,  # cancelled through RQ itself (rq-dashboard), without our meta
}


def stamp(meta: dict[str, Any], stage: str, at: float) -> None:
    """Record in `meta` that the job reached `stage` at unix time `at`."""
    meta.setdefault(META_TIMESTAMPS, {})[stage] = at


def client_status(rq_status: str | None, meta: dict[str, Any]) -> JobStatus:
    """The status a client sees, from RQ's status and the stages recorded in job.meta."""
    if meta.get(META_CANCELLED):
        return JobStatus.CANCELLED
    if meta.get(META_EXPIRED):
        return JobStatus.EXPIRED
    if meta.get(META_REJECTED):
        return JobStatus.REJECTED
    if rq_status in _RQ_TERMINAL:
        return _RQ_TERMINAL[rq_status]
    if rq_status == "started":
        return JobStatus.STARTED
    if meta.get(META_HELD):
        return JobStatus.HELD
    if STAGE_SCHEDULED in meta.get(META_TIMESTAMPS, {}):
        return JobStatus.SCHEDULED
    return JobStatus.QUEUED
