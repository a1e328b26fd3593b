"""A client's view of a job, from its RQ status, meta and result: what `GET /v1/jobs/<id>` answers and
what a webhook carries."""

from __future__ import annotations

from typing import Any

from shared.contract import (
    TERMINAL_STATUSES,
    ErrorInfo,
    JobResult,
    JobStatus,
    JobView,
    RouteTaken,
    StageTimes,
)
from shared.stages import (
    META_CANCELLED,
    META_DEADLINE,
    META_ERROR,
    META_EXPIRED,
    META_HELD,
    META_MODEL,
    META_PRIORITY,
    META_REJECTED,
    META_ROUTE,
    META_TIMESTAMPS,
    client_status,
)
from shared.tracing import trace_id_of


def job_url(job_id: str) -> str:
    """Where a client polls the job."""
    return f"/v1/jobs/{job_id}"


def build_view(
    job_id: str,
    meta: dict[str, Any],
    rq_status: str | None,
    result: dict[str, Any] | None = None,
    cancel_requested: bool = False,
) -> JobView:
    """The view of a job. `cancel_requested`: a client asked it to stop and it has not ended yet."""
    status = client_status(rq_status, meta)
    if cancel_requested and status not in TERMINAL_STATUSES:
        status = JobStatus.CANCELLING
    reasons = (META_CANCELLED, META_EXPIRED, META_ERROR, META_REJECTED)
    error = next((meta[k] for k in reasons if meta.get(k)), None)
    if status is JobStatus.FAILED and error is None:
        error = {"code": "job_failed", "message": "The job failed; see the worker's logs."}
    return JobView(
        id=job_id,
        status=status,
        model=meta.get(META_MODEL, ""),
        route=RouteTaken.model_validate(meta[META_ROUTE]) if META_ROUTE in meta else None,
        timestamps=StageTimes.model_validate(meta.get(META_TIMESTAMPS, {})),
        result=JobResult.model_validate(result) if status is JobStatus.FINISHED and result else None,
        error=ErrorInfo.model_validate(error) if error and status in TERMINAL_STATUSES - {JobStatus.FINISHED}
        else None,
        url=job_url(job_id),
        trace_id=trace_id_of(meta),
        held=ErrorInfo.model_validate(meta[META_HELD]) if status is JobStatus.HELD else None,
        priority=meta.get(META_PRIORITY, "normal"),
        deadline=meta.get(META_DEADLINE),
    )  # fmt: skip
