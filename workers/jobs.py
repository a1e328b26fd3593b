"""The RQ job functions, reached by dotted name (`workers.jobs.generate`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NoReturn

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from rq import get_current_job

from shared.cancellation import CancelWatch, cancel_requested
from shared.contract import JobRequest, JobResult, Usage
from shared.deadlines import expiry_message, past_deadline
from shared.endings import retention_of
from shared.errors import DeadlineExceeded, GptossError, JobCancelled
from shared.stages import (
    META_CANCELLED,
    META_ERROR,
    META_EXPIRED,
    META_REQUEST_ID,
    META_TIMESTAMPS,
    STAGE_FINISHED,
    STAGE_FIRST_TOKEN,
    STAGE_RECEIVED,
    STAGE_SCHEDULED,
    STAGE_STARTED,
    stamp,
)
from shared.tracing import context_from, exemplar
from shared.views import build_view
from shared.webhooks import notify
from workers import context
from workers.runtime import Generation, TokenSink
from workers.stream import JobStream

log = structlog.get_logger()
tracer = trace.get_tracer("gptoss.worker")


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one generation request; the returned dict is the job's RQ result (a JobResult)."""
    job = get_current_job()
    assert job is not None, "generate() runs inside an RQ worker"
    bound = context.current()
    runtime, queue = bound.runtime, bound.queue
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=job.id, request_id=job.meta.get(META_REQUEST_ID))
    stream = JobStream(job.connection, job.id, ttl=retention_of(job.meta))  # GET /v1/jobs/<id>/events
    if cancel_requested(job.connection, job.id):  # cancelled on its way here
        _end_early(job, stream, META_CANCELLED, JobCancelled("Cancelled by the client before it started."))
    if past_deadline(job.meta, time.time()):
        _end_early(job, stream, META_EXPIRED, DeadlineExceeded(expiry_message(job.meta, time.time())))
    started = time.time()
    stamp(job.meta, STAGE_STARTED, started)
    parent = context_from(job.meta)
    scheduled = job.meta.get(META_TIMESTAMPS, {}).get(STAGE_SCHEDULED)
    if scheduled is not None:
        wait = tracer.start_span(f"queue.wait {queue}", context=parent, start_time=int(scheduled * 1e9))
        wait.end(end_time=int(started * 1e9))
    attributes = {
        "messaging.system": "rq",
        "messaging.destination.name": queue,
        "messaging.message.id": job.id,
    }
    with tracer.start_as_current_span(
        "worker.job", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ):
        job.save_meta()
        log.info("job_started", model=runtime.spec.name, queue=queue)
        stream.start(model=runtime.spec.name, queue=queue, worker=bound.worker_name)

        def first_token() -> None:
            now = time.time()
            stamp(job.meta, STAGE_FIRST_TOKEN, now)
            job.save_meta()
            received = job.meta.get(META_TIMESTAMPS, {}).get(STAGE_RECEIVED, started)
            log.info("first_token", ttft_ms=round((now - received) * 1000, 1))

        # The worker's one error boundary: record a code and message the client can read, then let
        # RQ mark the job failed with its traceback.
        try:
            request = JobRequest.model_validate(payload)
            generation = _generate(request, first_token, stream.text, CancelWatch(job.connection, job.id))
        except GptossError as exc:
            _record_failure(job, exc.code, exc.message, exc)
            stream.error(exc.code, exc.message)
            notify(bound.webhooks, build_view(job.id, job.meta, "failed"), job.meta)
            raise
        except Exception as exc:
            _record_failure(job, "generation_failed", f"Generation failed: {type(exc).__name__}.", exc)
            stream.error("generation_failed", f"Generation failed: {type(exc).__name__}.")
            notify(bound.webhooks, build_view(job.id, job.meta, "failed"), job.meta)
            raise
        if generation.cancelled:
            message = f"Cancelled by the client after {generation.completion_tokens} tokens."
            _end_early(job, stream, META_CANCELLED, JobCancelled(message))
        stamp(job.meta, STAGE_FINISHED, time.time())
        job.save_meta()
        _observe(job.meta, generation)
        result = JobResult(
            text=generation.text,
            reasoning=generation.reasoning,
            finish_reason=generation.finish_reason,
            usage=Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                total_tokens=generation.prompt_tokens + generation.completion_tokens,
            ),
            model=runtime.spec.name,
            worker=bound.worker_name,
            queue=queue,
        )
        stream.done(result.model_dump(mode="json"), job.meta.get(META_TIMESTAMPS, {}))
        final = build_view(job.id, job.meta, "finished", result.model_dump(mode="json"))
        notify(bound.webhooks, final, job.meta)
        content = {"prompt": payload, "completion": generation.text} if bound.log_content else {}
        log.info(
            "job_finished",
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            **content,
        )
        return result.model_dump(mode="json")


def _generate(
    request: JobRequest,
    first_token: Any,
    on_text: TokenSink | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Generation:
    """The model call, as a span with the GenAI semantic-convention attributes."""
    runtime = context.current_runtime()
    operation = "chat" if request.messages is not None else "text_completion"
    with tracer.start_as_current_span(f"{operation} {runtime.spec.name}", kind=SpanKind.INTERNAL) as span:
        span.set_attributes(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": "huggingface.transformers",
                "gen_ai.request.model": runtime.spec.name,
                "gen_ai.request.max_tokens": request.max_tokens or 0,
                **{
                    f"gen_ai.request.{name}": value
                    for name, value in (("temperature", request.temperature), ("top_p", request.top_p),
                                        ("seed", request.seed))
                    if value is not None
                },
            }
        )  # fmt: skip
        generation = runtime.generate(request, first_token, on_text, cancelled)
        span.set_attributes(
            {
                "gen_ai.response.model": runtime.spec.name,
                "gen_ai.response.finish_reasons": [generation.finish_reason],
                "gen_ai.usage.input_tokens": generation.prompt_tokens,
                "gen_ai.usage.output_tokens": generation.completion_tokens,
            }
        )
        return generation


def _observe(meta: dict[str, Any], generation: Generation) -> None:
    """Record the job's latencies and token counts, each histogram with the trace as exemplar."""
    bound = context.current()
    if bound.metrics is None:
        return
    m, labels, stamps = bound.metrics, (bound.runtime.spec.name, bound.queue), meta.get(META_TIMESTAMPS, {})
    received, started = stamps.get(STAGE_RECEIVED), stamps.get(STAGE_STARTED)
    first, finished = stamps.get(STAGE_FIRST_TOKEN), stamps.get(STAGE_FINISHED)
    example = exemplar()
    if received is not None and first is not None:
        m.ttft.labels(*labels).observe(first - received, exemplar=example)
    if received is not None and finished is not None:
        m.e2e.labels(*labels).observe(finished - received, exemplar=example)
    if received is not None and started is not None:
        m.queue_time.labels(*labels).observe(started - received, exemplar=example)
    if first is not None and finished is not None and generation.completion_tokens > 1:
        m.itl.labels(*labels).observe(
            (finished - first) / (generation.completion_tokens - 1), exemplar=example
        )
    if started is not None and finished is not None and finished > started:
        m.tokens_per_second.labels(*labels).observe(generation.completion_tokens / (finished - started))
    m.prompt_tokens.labels(*labels).inc(generation.prompt_tokens)
    m.generation_tokens.labels(*labels).inc(generation.completion_tokens)
    m.jobs_terminal.labels(bound.runtime.spec.name, "finished").inc()


def _end_early(job: Any, stream: JobStream, kind: str, exc: GptossError) -> NoReturn:
    """End the job without a result: cancelled (before or during generation) or past its deadline.
    The reason goes in job.meta (the client sees `cancelled` or `expired`), the stream and the
    webhook; the raise lets RQ settle the job and the worker take the next one."""
    job.meta[kind] = {"code": exc.code, "message": exc.message}
    stamp(job.meta, STAGE_FINISHED, time.time())
    job.save_meta()
    stream.error(exc.code, exc.message)
    bound = context.current()
    if bound.metrics is not None:
        outcome = "cancelled" if kind == META_CANCELLED else "expired"
        bound.metrics.jobs_terminal.labels(bound.runtime.spec.name, outcome).inc()
    log.info("job_ended_early", code=exc.code)
    notify(bound.webhooks, build_view(job.id, job.meta, "failed"), job.meta)
    raise exc


def _record_failure(job: Any, code: str, message: str, exc: BaseException) -> None:
    job.meta[META_ERROR] = {"code": code, "message": message}
    stamp(job.meta, STAGE_FINISHED, time.time())
    job.save_meta()
    span = trace.get_current_span()
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, code))
    bound = context.current()
    if bound.metrics is not None:
        bound.metrics.jobs_terminal.labels(bound.runtime.spec.name, "failed").inc()
    log.error("job_failed", code=code)
