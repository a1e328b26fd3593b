"""A job's telemetry in the worker: the model call's span (GenAI semantic conventions) and the latency
and token metrics observed when it finishes."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from shared.contract import JobRequest
from shared.jobstore.record import JobRecord
from shared.tracing import exemplar
from workers.completion import Generation
from workers.context import WorkerContext


def chat_span(tracer: Tracer, request: JobRequest, model: str, parent: Span) -> Span:
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


def observe(bound: WorkerContext, record: JobRecord, generation: Generation) -> None:
    """Record the job's latencies and token counts, each histogram with the trace as exemplar.

    Latencies count from `received`, stamped when the request reached the API (before its body was
    parsed), so they are what the client saw less the network. The per-token gaps go into the ITL
    histogram in one call (one lock per request, not per token)."""
    if bound.metrics is None:
        return
    m, labels = bound.metrics, (bound.runtime.spec.name, bound.queue)
    received, started = record.at("received"), record.at("started")
    first, finished = record.at("first_token"), record.at("finished")
    example = exemplar()
    if received is not None and first is not None:
        m.ttft.labels(*labels).observe(first - received, exemplar=example)
    if received is not None and finished is not None:
        m.e2e.labels(*labels).observe(finished - received, exemplar=example)
    if received is not None and started is not None:
        m.queue_time.labels(*labels).observe(started - received, exemplar=example)
    if first is not None and finished is not None and generation.completion_tokens > 1:
        m.tpot.labels(*labels).observe(
            (finished - first) / (generation.completion_tokens - 1), exemplar=example
        )
    m.itl.observe_many(labels, generation.token_gaps, example)
    if started is not None and finished is not None and finished > started:
        speed = generation.completion_tokens / (finished - started)
        m.tokens_per_second.labels(*labels).observe(speed, exemplar=example)
    m.prompt_tokens.labels(*labels).inc(generation.prompt_tokens)
    m.generation_tokens.labels(*labels).inc(generation.completion_tokens)
    m.jobs_terminal.labels(bound.runtime.spec.name, "finished").inc()
