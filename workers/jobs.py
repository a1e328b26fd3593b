"""The RQ job functions, reached by dotted name (`workers.jobs.generate`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from rq import get_current_job

from shared.cancellation import CancelWatch, cancel_requested
from shared.contract import JobRequest, JobResult, PromptTokensDetails, Usage
from shared.deadlines import expiry_message, past_deadline
from shared.endings import retention_of
from shared.errors import DeadlineExceeded, GptossError, JobCancelled
from shared.response_cache import ResponseCache, channel_texts, store_finished
from shared.stages import (
    META_CACHE_KEY,
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
from workers.completion import Generation
from workers.stream import EventBuffer, JobStream

log = structlog.get_logger()
tracer = trace.get_tracer("gptoss.worker")


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one generation request; the returned dict is the job's RQ result (a JobResult)."""
    job = get_current_job()
    assert job is not None, "generate() runs inside an RQ worker"
    run = JobRun(job, context.current())
    with run.logging():
        request = run.begin(payload)
        if (cached := run.cached()) is not None:
            return run.finish_cached(cached)
        try:
            with run.generating():
                generation = run.bound.runtime.generate(request, run.first_token, run.stream.text, run.cancel)
        except Exception as exc:
            run.fail(exc)
            raise
        return run.finish(generation)


class JobRun:
    """One job inside a worker, run alone (`generate`) or in a batch beside others: the checks
    before it starts, its spans, stage stamps, stream and webhook, and its result or failure.

    The worker's one error boundary: a failure records a code and message the client can read,
    then the caller lets RQ fail the job with its traceback.
    """

    def __init__(self, job: Any, bound: context.WorkerContext, buffer: EventBuffer | None = None):
        self.job, self.bound = job, bound
        # GET /v1/jobs/<id>/events; in a batch, token events go out once per decode step (`buffer`).
        self.stream = JobStream(job.connection, job.id, ttl=retention_of(job.meta), buffer=buffer)
        self.cancel = CancelWatch(job.connection, job.id)
        self.request: JobRequest | None = None
        self._parent = context_from(job.meta)
        self._span: Span | None = None
        self._chat: Span | None = None
        self._started = time.time()

    @contextmanager
    def logging(self) -> Iterator[None]:
        """Log lines (RQ's too) carry this job's ids while inside; what was bound before comes back
        after (a batch enters one job's logging from inside another's callbacks)."""
        before = structlog.contextvars.get_contextvars()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            job_id=self.job.id, request_id=self.job.meta.get(META_REQUEST_ID)
        )
        try:
            yield
        finally:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**before)

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """This job's span (or its parent, before it starts) is the current one while inside."""
        if self._span is None:
            token = otel_context.attach(self._parent)
            try:
                yield
            finally:
                otel_context.detach(token)
            return
        with trace.use_span(self._span, end_on_exit=False):
            yield

    @contextmanager
    def generating(self) -> Iterator[None]:
        """The model-call span is the current one while inside (single-request generation)."""
        assert self._chat is not None
        with trace.use_span(self._chat, end_on_exit=False):
            yield

    def begin(self, payload: dict[str, Any]) -> JobRequest:
        """Check the job may still start, mark it started (stamp, spans, stream) and validate it."""
        job, bound = self.job, self.bound
        with self.tracing():
            if cancel_requested(job.connection, job.id):  # cancelled on its way here
                self._end_early(META_CANCELLED, JobCancelled("Cancelled by the client before it started."))
            if past_deadline(job.meta, time.time()):
                self._end_early(META_EXPIRED, DeadlineExceeded(expiry_message(job.meta, time.time())))
        self._started = started = time.time()
        stamp(job.meta, STAGE_STARTED, started)
        scheduled = job.meta.get(META_TIMESTAMPS, {}).get(STAGE_SCHEDULED)
        if scheduled is not None:
            wait = tracer.start_span(
                f"queue.wait {bound.queue}", context=self._parent, start_time=int(scheduled * 1e9)
            )
            wait.end(end_time=int(started * 1e9))
        attributes = {
            "messaging.system": "rq",
            "messaging.destination.name": bound.queue,
            "messaging.message.id": job.id,
        }
        self._span = tracer.start_span(
            "worker.job", context=self._parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        with self.tracing():
            job.save_meta()
            log.info("job_started", model=bound.runtime.spec.name, queue=bound.queue)
            self.stream.start(model=bound.runtime.spec.name, queue=bound.queue, worker=bound.worker_name)
            try:
                self.request = JobRequest.model_validate(payload)
            except Exception as exc:
                self.fail(exc)
                raise
            self._chat = _chat_span(self.request, bound.runtime.spec.name, self._span)
        return self.request

    def first_token(self) -> None:
        """The first token exists."""
        now = time.time()
        stamp(self.job.meta, STAGE_FIRST_TOKEN, now)
        self.job.save_meta()
        received = self.job.meta.get(META_TIMESTAMPS, {}).get(STAGE_RECEIVED, self._started)
        with self.logging(), self.tracing():
            log.info("first_token", ttft_ms=round((now - received) * 1000, 1))

    def finish(self, generation: Generation) -> dict[str, Any]:
        """The job's result (raises JobCancelled when a client cancelled it mid-generation)."""
        job, bound = self.job, self.bound
        self._end_chat(generation)
        if generation.cancelled:
            message = f"Cancelled by the client after {generation.completion_tokens} tokens."
            with self.tracing():
                self._end_early(META_CANCELLED, JobCancelled(message))
        stamp(job.meta, STAGE_FINISHED, time.time())
        with self.tracing():
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
                    prompt_tokens_details=PromptTokensDetails(cached_tokens=generation.cached_tokens)
                    if self.request is not None and self.request.session_id
                    else None,
                ),
                model=bound.runtime.spec.name,
                worker=bound.worker_name,
                queue=bound.queue,
                cache="miss" if job.meta.get(META_CACHE_KEY) else None,
            )
            # Before `done`: a client that saw it and asks again finds it.
            store_finished(job.connection, job.meta.get(META_CACHE_KEY), result.model_dump(mode="json"))
            self.stream.done(result.model_dump(mode="json"), job.meta.get(META_TIMESTAMPS, {}))
            final = build_view(job.id, job.meta, "finished", result.model_dump(mode="json"))
            notify(bound.webhooks, final, job.meta)
            content = {"prompt": self.request.model_dump(mode="json") if self.request else None,
                       "completion": generation.text} if bound.log_content else {}  # fmt: skip
            log.info(
                "job_finished",
                finish_reason=generation.finish_reason,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                **content,
            )
        self._end_span()
        return result.model_dump(mode="json")

    @property
    def fingerprint(self) -> str | None:
        """The response-cache fingerprint of a cacheable job (None: not cacheable)."""
        target = self.job.meta.get(META_CACHE_KEY)
        return str(target["fingerprint"]) if isinstance(target, dict) else None

    def cancel_waiting(self) -> NoReturn:
        """End a started job that was waiting on an identical one's result: cancelled by its client."""
        with self.tracing():
            self._end_early(META_CANCELLED, JobCancelled("Cancelled by the client before its answer came."))

    def cached(self) -> dict[str, Any] | None:
        """The cached result of an identical request that finished while this one waited (the API
        looked when it arrived; this catches a burst of identical requests queued behind the first),
        or None: generate."""
        target = self.job.meta.get(META_CACHE_KEY)
        if not isinstance(target, dict):
            return None
        with self.tracing():
            try:
                cache = ResponseCache(self.job.connection, int(target["ttl"]), int(target["max_bytes"]))
                return cache.lookup(str(target["fingerprint"]))
            except Exception as exc:  # a cache that cannot be read only means generating
                log.warning("cache_lookup_failed", error=f"{type(exc).__name__}: {exc}")
                return None

    def finish_cached(self, cached: dict[str, Any], source: str = "cache") -> dict[str, Any]:
        """The job's result taken from the cache (or from an identical job's result: `source`
        "identical") instead of generated: stamps, stream and webhook as for a generated one, marked
        `cache: "hit"`."""
        job = self.job
        self._end_chat(None)
        now = time.time()
        stamp(job.meta, STAGE_FIRST_TOKEN, now)
        stamp(job.meta, STAGE_FINISHED, now)
        result = {**cached, "cache": "hit"}
        with self.tracing():
            job.save_meta()
            for channel, text in channel_texts(result):
                self.stream.text(channel, text)
            self.stream.done(result, job.meta.get(META_TIMESTAMPS, {}))
            notify(self.bound.webhooks, build_view(job.id, job.meta, "finished", result), job.meta)
            log.info("cache_hit", at="worker", source=source, finish_reason=result.get("finish_reason"))
            if self.bound.metrics is not None:
                self.bound.metrics.worker_cache_hits.labels(self.bound.runtime.spec.name, source).inc()
        self._end_span()
        return result

    def fail(self, exc: BaseException) -> None:
        """Record why the job failed (a GptossError's code, else `generation_failed`); the caller
        then lets RQ fail it."""
        if isinstance(exc, GptossError):
            code, message = exc.code, exc.message
        else:
            code, message = "generation_failed", f"Generation failed: {type(exc).__name__}."
        self._end_chat(None, exc)
        with self.tracing():
            _record_failure(self.job, code, message, exc)
            self.stream.error(code, message)
            notify(self.bound.webhooks, build_view(self.job.id, self.job.meta, "failed"), self.job.meta)
        self._end_span()  # _record_failure put the exception on it

    def _end_early(self, kind: str, exc: GptossError) -> NoReturn:
        try:
            _end_early(self.job, self.stream, kind, exc)
        finally:
            self._end_span(exc)

    def _end_chat(self, generation: Generation | None, exc: BaseException | None = None) -> None:
        if self._chat is None:
            return
        if generation is not None:
            self._chat.set_attributes(
                {
                    "gen_ai.response.model": self.bound.runtime.spec.name,
                    "gen_ai.response.finish_reasons": [generation.finish_reason],
                    "gen_ai.usage.input_tokens": generation.prompt_tokens,
                    "gen_ai.usage.output_tokens": generation.completion_tokens,
                }
            )
        if exc is not None:
            self._chat.record_exception(exc)
            self._chat.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        self._chat.end()
        self._chat = None

    def _end_span(self, exc: BaseException | None = None) -> None:
        if self._span is None:
            return
        if exc is not None:
            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        self._span.end()
        self._span = None


def _chat_span(request: JobRequest, model: str, parent: Span) -> Span:
    """The model call's span, with the GenAI semantic-convention attributes."""
    operation = "chat" if request.messages is not None else "text_completion"
    return tracer.start_span(
        f"{operation} {model}",
        context=trace.set_span_in_context(parent),
        kind=SpanKind.INTERNAL,
        attributes={
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": "huggingface.transformers",
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": request.max_tokens or 0,
            **{
                f"gen_ai.request.{name}": value
                for name, value in (("temperature", request.temperature), ("top_p", request.top_p),
                                    ("seed", request.seed))
                if value is not None
            },
        },
    )  # fmt: skip


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
