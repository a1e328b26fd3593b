"""The sampler and the trace context carried in the job's record."""

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import SpanKind

from shared.jobstore.record import JobRecord
from shared.tracing import ProjectSampler, context_from, forced, trace_id_of

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def decide(sampler: ProjectSampler, parent: str | None = None, kind: SpanKind = SpanKind.SERVER) -> Decision:
    ctx = context_from(parent) if parent else None
    return sampler.should_sample(ctx, 0x1234, "span", kind).decision


def test_ratio_zero_samples_no_new_trace() -> None:
    assert decide(ProjectSampler(0.0)) is Decision.DROP


def test_forced_request_is_sampled_whatever_the_ratio() -> None:
    with forced(True):
        assert decide(ProjectSampler(0.0)) is Decision.RECORD_AND_SAMPLE
    assert decide(ProjectSampler(0.0)) is Decision.DROP


def test_parent_decision_is_followed() -> None:
    assert decide(ProjectSampler(0.0), PARENT) is Decision.RECORD_AND_SAMPLE
    assert decide(ProjectSampler(1.0), UNSAMPLED_PARENT) is Decision.DROP


def test_client_call_without_parent_is_never_sampled() -> None:
    # Idle Redis polling and heartbeats make no traces, even at 100%.
    assert decide(ProjectSampler(1.0), kind=SpanKind.CLIENT) is Decision.DROP
    with forced(True):
        assert decide(ProjectSampler(1.0), kind=SpanKind.CLIENT) is Decision.DROP
    assert decide(ProjectSampler(0.0), PARENT, kind=SpanKind.CLIENT) is Decision.RECORD_AND_SAMPLE


def test_record_round_trip_keeps_trace_and_parent() -> None:
    tracer = TracerProvider(sampler=ProjectSampler(1.0)).get_tracer("test")
    record = JobRecord()
    with tracer.start_as_current_span("api") as span:
        record.carry_trace()
        sent = span.get_span_context()
    record = JobRecord.from_meta(record.to_meta())  # as the next process reads it
    assert trace_id_of(record.traceparent) == format(sent.trace_id, "032x")
    with tracer.start_as_current_span("worker", context=record.trace_context()) as child:
        assert child.get_span_context().trace_id == sent.trace_id
        assert child.parent is not None and child.parent.span_id == sent.span_id
    assert trace.get_current_span().get_span_context().is_valid is False
    assert trace_id_of(None) is None


def test_sampling_ratio_follows_environment() -> None:
    from shared.settings import Settings

    assert Settings(environment="development").sample_ratio() == 1.0
    assert Settings(environment="production").sample_ratio() == 0.03
    assert Settings(environment="production", trace_sample_ratio=0.5).sample_ratio() == 0.5
