"""`/v1/jobs`: submit a generation job, poll it, list your jobs, cancel one."""

from __future__ import annotations

import re
from typing import Any

import structlog
from flask import Blueprint, jsonify, request
from redis import Redis

from api.body import read_json
from api.services import services
from api.submission import submit, webhooks
from api.tenancy import current_tenant, owned_job
from shared.cancellation import cancel_requested
from shared.contract import TERMINAL_STATUSES, JobList, JobStatus, JobSubmission, JobView
from shared.errors import JobEnded, JobNotFound, ValidationFailed
from shared.jobstore import lifecycle, rqstore
from shared.jobstore.views import build_view
from shared.json_body import parse_body
from shared.retention import recent_ids
from shared.webhooks import WebhookSender, notify

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
log = structlog.get_logger()

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Shape of a job id we look up; anything else is unknown without touching Redis."""

LIST_LIMIT, LIST_LIMIT_MAX = 20, 100
"""Jobs per page of `GET /v1/jobs` by default, and at most."""


@bp.post("")
def create():  # type: ignore[no-untyped-def]
    """Validate a request and enqueue it; answer 202 with where to poll (200 and the full job: when
    an Idempotency-Key repeats an earlier request, or when the response cache answered it, finished)."""
    body = read_json()
    submitted = submit(parse_body(body, JobSubmission), "/v1/jobs", body)
    view = job_view(owned_job(submitted.job_id)) if submitted.replayed or submitted.cached else None
    response = jsonify(
        view.model_dump(mode="json", exclude_none=True)
        if view is not None
        else {
            "id": submitted.job_id,
            "object": "job",
            "status": JobStatus.QUEUED,
            "url": f"/v1/jobs/{submitted.job_id}",
        }
    )
    response.status_code = 200 if view is not None else 202
    response.headers["Location"] = f"/v1/jobs/{submitted.job_id}"
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("")
def index():  # type: ignore[no-untyped-def]
    """The caller's recent jobs, newest first: `limit` per page, the next page `after` the last id."""
    given = request.args.get("limit", str(LIST_LIMIT))
    # ASCII digits only: int() would also take " 1_0 " or other scripts' digits
    limit = int(given) if given.isascii() and given.isdigit() and len(given) <= 3 else 0
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise ValidationFailed(f"limit must be an integer from 1 to {LIST_LIMIT_MAX}.")
    after = request.args.get("after")
    if after is not None and not JOB_ID.match(after):
        raise ValidationFailed("after must be a job id from an earlier page.")
    redis = services().redis
    ids, more = recent_ids(redis, current_tenant(), limit, after)
    jobs = rqstore.fetch_many(ids, redis)
    views = [job_view(job) for job in jobs if job is not None]  # expired ones are gone
    page = JobList(
        data=views,
        first_id=views[0].id if views else None,
        last_id=views[-1].id if views else None,
        has_more=more,
    )
    return jsonify(page.model_dump(mode="json", exclude_none=True))


@bp.get("/<job_id>")
def show(job_id: str):  # type: ignore[no-untyped-def]
    """The job's status, route, stage timestamps and, once finished, its result."""
    return jsonify(job_view(find_job(job_id)).model_dump(mode="json", exclude_none=True))


@bp.delete("/<job_id>")
def cancel(job_id: str):  # type: ignore[no-untyped-def]
    """Cancel the job: a waiting one ends `cancelled` at once (200); a running one stops at its next
    decode step (202, `cancelling`). A job that already ended answers 409 (200 if it was cancelled)."""
    job = find_job(job_id)
    view = job_view(job)
    if view.status is JobStatus.CANCELLED:
        return jsonify(view.model_dump(mode="json", exclude_none=True))
    if view.status in TERMINAL_STATUSES:
        raise JobEnded(f"The job `{job_id}` already ended `{view.status.value}`; there is nothing to cancel.")
    ended = cancel_job(services().redis, job, "Cancelled by the client.", webhooks())
    view = job_view(job)
    response = jsonify(view.model_dump(mode="json", exclude_none=True))
    response.status_code = 200 if ended else 202
    return response


def cancel_job(redis: Redis, job: Any, message: str, sender: WebhookSender | None) -> bool:
    """Cancel `job`: True when it was still waiting and is now ended `cancelled`; False when a
    scheduler or worker holds it and stops it on seeing the flag. Needs no request context."""
    record = lifecycle.cancel(redis, job, message)
    if record is None:
        log.info("job_cancel_requested", job_id=job.id)
        return False
    log.info("job_cancelled", job_id=job.id, while_="waiting")
    notify(sender, build_view(job.id, record, "canceled"), record)
    return True


def find_job(job_id: str) -> Any:
    """The caller's job `job_id` (404 if unknown or another tenant's, 410 once expired)."""
    if not JOB_ID.match(job_id):
        raise JobNotFound(f"No job `{job_id}`.")
    return owned_job(job_id)


def job_view(job: Any) -> JobView:
    """A client's view of an RQ job."""
    rq_status = job.get_status(refresh=False)
    result = job.return_value() if rq_status == "finished" else None
    view = build_view(job.id, lifecycle.read(job), rq_status, result)
    if view.status not in TERMINAL_STATUSES and cancel_requested(services().redis, job.id):
        view = view.model_copy(update={"status": JobStatus.CANCELLING})
    return view
