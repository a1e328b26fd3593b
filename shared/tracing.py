"""OpenTelemetry set-up and the trace context that travels in the job's record from process to process."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from shared.settings import Settings

FORCE_TRACE_HEADER = "X-Force-Trace"
"""A request carrying this header (any non-empty value but 0) is traced whatever the ratio."""

FILE_EXPORT_DELAY_MS = 200
"""Milliseconds between writes of finished spans to the trace file."""

_force = contextvars.ContextVar("gptoss_force_trace", default=False)
_propagator = TraceContextTextMapPropagator()


class ProjectSampler(Sampler):
    """Parent-based ratio sampling, forced on for a request that asks, and never sampling a client
    call (a Redis command) that has no parent: idle polling and heartbeats make no traces, while
    calls inside a request or a job are traced with it."""

    def __init__(self, ratio: float):
        self._ratio = ratio
        self._delegate = ParentBased(TraceIdRatioBased(ratio))

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid:
            if kind == SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            if _force.get():
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"ProjectSampler(ratio={self._ratio})"


def configure_tracing(settings: Settings, process: str) -> TracerProvider | None:
    """Install the process's tracer provider: OTLP/HTTP when an endpoint is set, a file when asked."""
    if not settings.observability:
        return None
    name = settings.otel_service_name or f"gptoss-{process}"
    provider = TracerProvider(
        resource=Resource.create(resource_attributes(settings, name, process)),
        sampler=ProjectSampler(settings.sample_ratio()),
    )
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if settings.trace_dir is not None:
        settings.trace_dir.mkdir(parents=True, exist_ok=True)
        out = open(settings.trace_dir / f"{process}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
        # Batched in a background thread, as OTLP export is: a job's many spans cost no I/O inline.
        exporter = ConsoleSpanExporter(out=out, formatter=_one_line)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=FILE_EXPORT_DELAY_MS))
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument(tracer_provider=provider)
    return provider


def resource_attributes(settings: Settings, name: str, process: str) -> dict[str, str]:
    """The process's OTel resource: its service, and the cluster, region and instance it runs in
    (OTEL_RESOURCE_ATTRIBUTES, read by the SDK, may add more). `service.instance.id` is the SDK's
    own, a UUID per process, renewed after a fork (gunicorn's API workers)."""
    identity = settings.telemetry_identity()
    return {
        "service.name": name,
        "gptoss.process": process,
        **{f"gptoss.{key}": value for key, value in identity.items()},
        "cloud.region": identity["region"],
    }


def _one_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


@contextmanager
def forced(on: bool) -> Iterator[None]:
    """Within the block, a new root span is sampled whatever the ratio (when `on`)."""
    token = _force.set(on)
    try:
        yield
    finally:
        _force.reset(token)


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C fields (`traceparent`, and `tracestate` when there is one)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def context_from(traceparent: str | None, tracestate: str | None = None) -> otel_context.Context:
    """The trace context a previous process recorded (empty when none)."""
    carrier = {k: v for k, v in (("traceparent", traceparent), ("tracestate", tracestate)) if v}
    return _propagator.extract(carrier)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a W3C traceparent, if it is one."""
    if isinstance(traceparent, str) and traceparent.count("-") == 3:
        return traceparent.split("-")[1]
    return None


def current_ids() -> dict[str, str]:
    """trace_id and span_id of the current span (sampled or not), for logs and exemplars."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def exemplar() -> dict[str, str] | None:
    """An exemplar naming the current trace, only when that trace is sampled (so it exists)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
