"""One job's run inside a worker's session: the checks before it starts, its record, spans, stream and
webhook, and its result or failure."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from redis import Redis
from rq.job import Job

from shared.cancellation import CancelWatch, cancel_requested
from shared.contract import ChoiceResult, JobRequest, JobResult, PromptTokensDetails, TokenLogprob, Usage
from shared.errors import DeadlineExceeded, GptossError, JobCancelled
from shared.harmony import FINAL_CHANNEL
from shared.jobstore import runs
from shared.jobstore.events import EventBuffer, Fence, JobStream
from shared.jobstore.record import Ending, JobRecord
from shared.jobstore.views import build_view
from shared.response_cache import ResponseCache, channel_texts, store_finished
from shared.webhooks import notify
from workers.completion import Generation
from workers.context import WorkerContext
from workers.sampling import logprob_entries
from workers.telemetry import chat_span, observe

log = structlog.get_logger()
tracer = trace.get_tracer("gptoss.worker")

Refusal = tuple[Ending, GptossError]
"""Why a job taken by a worker must not start: its ending and the error its client reads."""


class JobRun:
    """One run of a job inside a worker, beside the others of its session.

    The worker's one error boundary: a failure records a code and message the client can read in the
    run's record; the session then settles the job (shared/jobstore/runs.settle: RQ's failure with
    its traceback, the record and the `error` event together, only while the run holds the job's
    fence), and `failed` tells its webhook. A result goes the same way through `finished`.
    """

    def __init__(self, job: Job, record: JobRecord, bound: WorkerContext, buffer: EventBuffer | None = None):
        self.job, self.record, self.bound = job, record, bound
        self.redis: Redis = job.connection
        # GET /v1/jobs/<id>/events; token events go out once per decode step (`buffer`).
        self.stream = JobStream(self.redis, job.id, ttl=record.retention, buffer=buffer)
        self.cancel = CancelWatch(self.redis, job.id)
        self.request: JobRequest | None = None
        self._parent = record.trace_context()
        self._span: Span | None = None
        self._chat: Span | None = None
        self._started = time.time()
        self._generation: Generation | None = None
        self.fence: Fence | None = None

    @contextmanager
    def logging(self) -> Iterator[None]:
        """Log lines (RQ's too) carry this job's ids while inside; what was bound before comes back
        after (a session enters one job's logging from inside another's callbacks)."""
        before = structlog.contextvars.get_contextvars()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=self.job.id, request_id=self.record.request_id)
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

    def refusal(self) -> Refusal | None:
        """Why the job must not start (cancelled on its way here, or past its deadline), or None."""
        if cancel_requested(self.redis, self.job.id):
            return "cancelled", JobCancelled("Cancelled by the client before it started.")
        now = time.time()
        if self.record.past_deadline(now):
            return "expired", DeadlineExceeded(self.record.expiry_message(now))
        return None

    def fenced(self, token: int) -> None:
        """The run started with fencing token `token`: its writes count only while it holds it."""
        self.fence = self.stream.fence = runs.fence_of(self.job, token)

    @property
    def superseded(self) -> bool:
        """The job was handed back (or another run holds it): this run must write nothing more."""
        return self.stream.superseded

    def begin(self, request: JobRequest | None) -> None:
        """The job started (its record stamped it): its spans, its `start` event, its log line.
        `request`: its valid request, None when it has none (it fails next)."""
        bound = self.bound
        self._started = started = self.record.at("started") or time.time()
        scheduled = self.record.at("scheduled")
        if scheduled is not None:
            wait = tracer.start_span(
                f"queue.wait {bound.queue}", context=self._parent, start_time=int(scheduled * 1e9)
            )
            wait.end(end_time=int(started * 1e9))
        attributes = {
            "messaging.system": "rq",
            "messaging.destination.name": bound.queue,
            "messaging.message.id": self.job.id,
        }
        self._span = tracer.start_span(
            "worker.job", context=self._parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        with self.tracing():
            log.info("job_started", model=bound.runtime.spec.name, queue=bound.queue)
            self.stream.start(
                model=bound.runtime.spec.name,
                queue=bound.queue,
                worker=bound.worker_name,
                attempt=self.record.attempt,
            )
        self.request = request
        if request is not None:
            self._chat = chat_span(tracer, request, bound.runtime.spec.name, self._span)

    def first_token(self) -> None:
        """The first token exists."""
        now = time.time()
        self.record.stamp("first_token", now)
        if self.fence is not None and not runs.write_record(self.redis, self.job, self.record, self.fence):
            self.stream.superseded = True
        received = self.record.at("received") or self._started
        with self.logging(), self.tracing():
            log.info("first_token", ttft_ms=round((now - received) * 1000, 1))

    def finish(self, generation: Generation, others: Sequence[Generation] = ()) -> dict[str, Any]:
        """The job's result, to settle: `generation`, and `others` (the other choices, when `n` > 1)
        (raises JobCancelled, recorded, when a client cancelled it mid-generation)."""
        bound, record = self.bound, self.record
        asked = self.request is not None and self.request.logprobs

        def logprobs(made: Generation) -> list[TokenLogprob] | None:
            return logprob_entries(made.logprobs, bound.runtime.token_bytes) if asked else None

        every = [generation, *others]
        choices = [
            ChoiceResult(index=i, text=g.text, reasoning=g.reasoning, finish_reason=g.finish_reason,
                         logprobs=logprobs(g))
            for i, g in enumerate(every)
        ] if others else None  # fmt: skip
        made = sum(g.completion_tokens for g in every)
        self._end_chat(generation)
        self._generation = generation
        if generation.cancelled:
            message = f"Cancelled by the client after {generation.completion_tokens} tokens."
            self._end_early("cancelled", JobCancelled(message))
        return JobResult(
            text=generation.text,
            reasoning=generation.reasoning,
            finish_reason=generation.finish_reason,
            tool_calls=list(generation.tool_calls) or None,
            usage=Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=made,
                total_tokens=generation.prompt_tokens + made,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=generation.cached_tokens)
                if self.request is not None and self.request.session_id
                else None,
            ),
            model=bound.runtime.spec.name,
            logprobs=logprobs(generation),
            choices=choices,
            worker=bound.worker_name,
            queue=bound.queue,
            cache="miss" if record.cache_key else None,
        ).model_dump(mode="json")

    def finished(self, result: dict[str, Any], source: str | None = None) -> None:
        """The job was settled with `result` (generated, or `source`: "cache" or "identical"): the
        cache keeps a generated one, its webhook is told, its metrics and log line."""
        job, bound, record = self.job, self.bound, self.record
        with self.tracing():
            if source is None:
                target = record.cache_key.model_dump() if record.cache_key is not None else None
                store_finished(self.redis, target, result)
                if self._generation is not None:
                    observe(bound, record, self._generation)
            notify(bound.webhooks, build_view(job.id, record, "finished", result), record)
            if source is not None:
                log.info("cache_hit", at="worker", source=source, finish_reason=result.get("finish_reason"))
                if bound.metrics is not None:
                    bound.metrics.worker_cache_hits.labels(bound.runtime.spec.name, source).inc()
            else:
                generation = self._generation
                content = {"prompt": self.request.model_dump(mode="json") if self.request else None,
                           "completion": result.get("text")} if bound.log_content else {}  # fmt: skip
                usage = result.get("usage", {})
                log.info(
                    "job_finished",
                    finish_reason=generation.finish_reason if generation else result.get("finish_reason"),
                    prompt_tokens=usage.get("prompt_tokens"),
                    completion_tokens=usage.get("completion_tokens"),
                    **content,
                )
        self._end_span()

    def webhook(self, status: str, result: dict[str, Any] | None = None) -> tuple[str, str] | None:
        """The outbox entry of the job's webhook for its ending (`status`), for the settling to
        write; None when it has no webhook."""
        sender, url = self.bound.webhooks, self.record.webhook
        if sender is None or url is None or not sender.has_outbox:
            return None
        view = build_view(self.job.id, self.record, status, result)
        return sender.entry(url, view, self.record.tenant_or_default)

    @property
    def fingerprint(self) -> str | None:
        """The response-cache fingerprint of a cacheable job (None: not cacheable)."""
        target = self.record.cache_key
        return target.fingerprint if target is not None else None

    def cancel_waiting(self) -> NoReturn:
        """End a started job that was waiting on an identical one's result: cancelled by its client."""
        with self.tracing():
            self._end_early("cancelled", JobCancelled("Cancelled by the client before its answer came."))

    def cached(self) -> dict[str, Any] | None:
        """The cached result of an identical request that finished while this one waited (the API
        looked when it arrived; this catches a burst of identical requests queued behind the first),
        or None: generate."""
        target = self.record.cache_key
        if target is None:
            return None
        with self.tracing():
            try:
                return ResponseCache(self.redis, target.ttl, target.max_bytes).lookup(target.fingerprint)
            except Exception as exc:  # a cache that cannot be read only means generating
                log.warning("cache_lookup_failed", error=f"{type(exc).__name__}: {exc}")
                return None

    def finish_cached(self, cached: dict[str, Any]) -> dict[str, Any]:
        """The job's result taken from the cache (or from an identical job's result) instead of
        generated, marked `cache: "hit"`, its texts streamed as a generated one's: to settle."""
        self._end_chat(None)
        self.record.stamp("first_token")
        result = {**cached, "cache": "hit"}
        with self.tracing():
            for channel, text in channel_texts(result):  # the answer's logprobs with its text, if kept
                self.stream.text(channel, text, result.get("logprobs") if channel == FINAL_CHANNEL else None)
        return result

    def fail(self, exc: BaseException) -> None:
        """Record why the job failed (a GptossError's code, else `generation_failed`), unless its
        record says why already; the session then settles it."""
        if self.record.ending() is not None:
            return
        if isinstance(exc, GptossError):
            code, message = exc.code, exc.message
        else:
            code, message = "generation_failed", f"Generation failed: {type(exc).__name__}."
        self._end_chat(None, exc)
        self.record.end("error", code, message)
        with self.tracing():
            span = trace.get_current_span()
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, code))

    def failed(self) -> None:
        """The job was settled without a result (its record says why): metrics, log, webhook."""
        record = self.record
        with self.tracing():
            if record.cancelled is not None or record.expired is not None:
                reason = record.cancelled or record.expired
                self._count("cancelled" if record.cancelled is not None else "expired")
                log.info("job_ended_early", code=reason.code if reason else None)
            else:
                self._count("failed")
                log.error("job_failed", code=record.error.code if record.error else None)
            notify(self.bound.webhooks, build_view(self.job.id, record, "failed"), record)
        self._end_span()

    def _end_early(self, kind: Ending, exc: GptossError) -> NoReturn:
        """End the started job without a result (cancelled mid-run): recorded, then raise `exc`; the
        session settles it. The client chose this ending: its spans carry it as an event, not as an
        error with a traceback."""
        self.record.end(kind, exc.code, exc.message)
        for span in (self._chat, self._span):
            if span is not None:
                span.add_event(f"job.{kind}", {"code": exc.code, "message": exc.message})
        self._end_chat(None)
        raise exc

    def _count(self, outcome: str) -> None:
        if self.bound.metrics is not None:
            self.bound.metrics.jobs_terminal.labels(self.bound.runtime.spec.name, outcome).inc()

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
