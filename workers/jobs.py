"""The RQ job functions, reached by dotted name (`workers.jobs.generate`)."""

from __future__ import annotations

import time
from typing import Any

import structlog
from rq import get_current_job

from shared.contract import JobRequest, JobResult, Usage
from shared.errors import GptossError
from shared.stages import (
    META_ERROR,
    META_REQUEST_ID,
    STAGE_FINISHED,
    STAGE_FIRST_TOKEN,
    STAGE_STARTED,
    stamp,
)
from workers.context import current_runtime, current_worker

log = structlog.get_logger()


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one generation request; the returned dict is the job's RQ result (a JobResult)."""
    job = get_current_job()
    assert job is not None, "generate() runs inside an RQ worker"
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=job.id, request_id=job.meta.get(META_REQUEST_ID))
    runtime = current_runtime()
    worker, queue = current_worker()
    stamp(job.meta, STAGE_STARTED, time.time())
    job.save_meta()
    log.info("job_started", model=runtime.spec.name, queue=queue)

    def first_token() -> None:
        stamp(job.meta, STAGE_FIRST_TOKEN, time.time())
        job.save_meta()

    # The worker's one error boundary: record a code and message the client can read, then let RQ
    # mark the job failed with its traceback.
    try:
        request = JobRequest.model_validate(payload)
        generation = runtime.generate(request, first_token)
    except GptossError as exc:
        _record_failure(job, exc.code, exc.message)
        raise
    except Exception as exc:
        _record_failure(job, "generation_failed", f"Generation failed: {type(exc).__name__}.")
        raise
    stamp(job.meta, STAGE_FINISHED, time.time())
    job.save_meta()
    result = JobResult(
        text=generation.text,
        finish_reason=generation.finish_reason,
        usage=Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
        ),
        model=runtime.spec.name,
        worker=worker,
        queue=queue,
    )
    log.info(
        "job_finished",
        finish_reason=generation.finish_reason,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
    )
    return result.model_dump(mode="json")


def _record_failure(job: Any, code: str, message: str) -> None:
    job.meta[META_ERROR] = {"code": code, "message": message}
    stamp(job.meta, STAGE_FINISHED, time.time())
    job.save_meta()
    log.error("job_failed", code=code)
