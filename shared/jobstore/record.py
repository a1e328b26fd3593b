"""The job's record: what travels with a job in RQ's job.meta, typed and validated on read.

Only this package reads or writes job.meta; every other module holds a `JobRecord`. The record has
a schema version: a record written by an earlier version still reads (version 1 had no `schema`
field and no attempt number), and fields a later version added are kept as they are when this one
writes the record back, so processes of two versions can share jobs during a rolling upgrade.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from opentelemetry.context import Context
from pydantic import BaseModel, ConfigDict, Field

from shared import keys
from shared.contract import ErrorInfo, JobStatus, Priority, RouteTaken, StageTimes
from shared.tracing import context_from, current_carrier

SCHEMA_VERSION = 2
"""The record's layout this code writes (1: before the record had an owner and attempts)."""

Stage = Literal["received", "scheduled", "started", "first_token", "finished"]
"""A stage whose time the record keeps (the fields of StageTimes)."""

Ending = Literal["rejected", "cancelled", "expired"]
"""Why a job ended without running (each a field of the record)."""

_RQ_TERMINAL = {
    "finished": JobStatus.FINISHED,
    "failed": JobStatus.FAILED,
    "stopped": JobStatus.FAILED,
    "canceled": JobStatus.CANCELLED,  # cancelled through RQ itself (rq-dashboard), without our record
}


class CacheTarget(BaseModel):
    """Where a cacheable job's result is stored (the response-cache entry and the limits to keep)."""

    fingerprint: str
    ttl: int
    max_bytes: int


class JobRecord(BaseModel):
    """Everything the processes tell each other about one job, beside RQ's own fields."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, populate_by_name=True)

    schema_version: int = Field(default=1, alias="schema")
    request_id: str | None = None
    model: str = ""
    tenant: str | None = None
    priority: Priority = "normal"
    retention: int = keys.RESULT_TTL
    """Seconds the job is kept after it ends."""
    deadline: float | None = None
    """Unix time by which the job must have started."""
    webhook: str | None = None
    cache_key: CacheTarget | None = None
    """Set when the job is cacheable: the worker stores its result there."""
    timestamps: StageTimes = Field(default_factory=StageTimes)
    route: RouteTaken | None = None
    prompt_tokens: int | None = None
    """The prompt's tokens as the API (or else the scheduler) counted them."""
    held: ErrorInfo | None = None
    rejected: ErrorInfo | None = None
    cancelled: ErrorInfo | None = None
    expired: ErrorInfo | None = None
    error: ErrorInfo | None = None
    retries: int = 0
    """Times the job went back to its queue because its worker was lost."""
    attempt: int = 0
    """The number of the job's current run (0: never started); a fencing token."""
    traceparent: str | None = None
    tracestate: str | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> JobRecord:
        """The record stored in a job's meta (any schema version)."""
        return cls.model_validate(meta or {})

    def to_meta(self) -> dict[str, Any]:
        """The record as job.meta holds it (written with this code's schema version)."""
        meta = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        meta["schema"] = max(SCHEMA_VERSION, self.schema_version)
        return meta

    def stamp(self, stage: Stage, at: float | None = None) -> None:
        """The job reached `stage` at unix time `at` (now by default)."""
        setattr(self.timestamps, stage, time.time() if at is None else at)

    def at(self, stage: Stage) -> float | None:
        """When the job reached `stage`, if it has."""
        return getattr(self.timestamps, stage)

    def ending(self) -> ErrorInfo | None:
        """Why the job ended without a result (cancelled, expired, failed or rejected), if it did."""
        return self.cancelled or self.expired or self.error or self.rejected

    def end(self, kind: Ending | Literal["error"], code: str, message: str) -> None:
        """Record why the job ends (`kind`) and when."""
        self.held = None
        setattr(self, kind, ErrorInfo(code=code, message=message))
        self.stamp("finished")

    @property
    def tenant_or_default(self) -> str:
        """The job's tenant (jobs of a server without auth belong to the default one)."""
        return self.tenant or keys.DEFAULT_TENANT

    def status(self, rq_status: str | None) -> JobStatus:
        """The status a client sees, from RQ's status and the stages in this record."""
        if self.cancelled:
            return JobStatus.CANCELLED
        if self.expired:
            return JobStatus.EXPIRED
        if self.rejected:
            return JobStatus.REJECTED
        if rq_status in _RQ_TERMINAL:
            return _RQ_TERMINAL[rq_status]
        if rq_status == "started":
            return JobStatus.STARTED
        if self.held:
            return JobStatus.HELD
        if self.timestamps.scheduled is not None:
            return JobStatus.SCHEDULED
        return JobStatus.QUEUED

    def carry_trace(self) -> None:
        """Record the current trace context, so the next process continues this trace."""
        carrier = current_carrier()
        self.traceparent, self.tracestate = carrier.get("traceparent"), carrier.get("tracestate")

    def trace_context(self) -> Context:
        """The trace context the previous process recorded (empty when none)."""
        return context_from(self.traceparent, self.tracestate)

    def past_deadline(self, now: float) -> bool:
        """The job was due to start before `now`."""
        return self.deadline is not None and now > self.deadline

    def expiry_message(self, now: float) -> str:
        """Why a job expired, for the client."""
        late = now - (self.deadline if self.deadline is not None else now)
        return f"The job was not started by its deadline (late by {late:.1f} s); it will not run."
