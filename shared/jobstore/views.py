"""A client's view of a job, from its RQ status, record and result: what `GET /v1/jobs/<id>` answers
and what a webhook carries."""

from __future__ import annotations

from typing import Any

from shared.contract import TERMINAL_STATUSES, ErrorInfo, JobResult, JobStatus, JobView
from shared.jobstore.record import JobRecord
from shared.tracing import trace_id_of


def job_url(job_id: str) -> str:
    """Where a client polls the job."""
    return f"/v1/jobs/{job_id}"


def build_view(
    job_id: str,
    record: JobRecord,
    rq_status: str | None,
    result: dict[str, Any] | None = None,
    cancel_requested: bool = False,
) -> JobView:
    """The view of a job. `cancel_requested`: a client asked it to stop and it has not ended yet."""
    status = record.status(rq_status)
    if cancel_requested and status not in TERMINAL_STATUSES:
        status = JobStatus.CANCELLING
    error = record.ending()
    if status is JobStatus.FAILED and error is None:
        error = ErrorInfo(code="job_failed", message="The job failed; see the worker's logs.")
    return JobView(
        id=job_id,
        status=status,
        model=record.model,
        route=record.route,
        timestamps=record.timestamps,
        result=JobResult.model_validate(result) if status is JobStatus.FINISHED and result else None,
        error=error if error and status in TERMINAL_STATUSES - {JobStatus.FINISHED} else None,
        url=job_url(job_id),
        trace_id=trace_id_of(record.traceparent),
        held=record.held if status is JobStatus.HELD else None,
        priority=record.priority,
        deadline=record.deadline,
    )
