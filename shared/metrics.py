"""The Prometheus metric catalogue: every `gptoss_` metric, built per process into its own registry.

Names follow what vLLM users know (time to first token, e2e latency, inter-token latency, queue
time, prompt/generation token counters). Labels stay low-cardinality: model, queue, route, status,
outcome, reason — never job ids. Histograms carry exemplars with the trace id when served as
OpenMetrics. Latency buckets come from `shared/sla.py`, so every SLA threshold is a bucket edge;
each process starts its labelled counters at 0 for the label values it knows (`start_at_zero`), so
the first failure is already a rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from shared import sla
from shared.histograms import BatchHistogram

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""API request duration buckets (seconds)."""

TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Per-request decode speed buckets (tokens per second)."""

JOB_STATUSES_WORKER = ("finished", "failed", "cancelled", "expired")
"""Terminal statuses a worker counts in `gptoss_jobs_total`."""

JOB_STATUSES_SCHEDULER = ("rejected", "cancelled", "expired")
"""Terminal statuses the scheduler counts in `gptoss_jobs_total` (jobs that never ran)."""

API_REFUSALS = ("backlog_full", "tenant_backlog_full")
"""Reasons the API refuses a submission (admission outcome `refused`)."""

SERVER_ERROR_STATUSES = ("500", "503", "504")
"""5xx answers the API gives (shared/errors.py); each route starts with these at 0, so the
availability rule counts the first one."""

WORKER_CACHE_SOURCES = ("cache", "identical")
"""How a worker answers a cacheable job without generating it."""


def label_process(registry: CollectorRegistry, process: str, identity: Mapping[str, str]) -> None:
    """`gptoss_process_info{process, cluster, region, instance} 1`: where this process runs, from
    settings, so one central Prometheus can tell clusters apart even without external labels."""
    info = Info("gptoss_process", "The process and where it runs", registry=registry)
    info.info({"process": process, **identity})


class ApiMetrics:
    """Metrics of the API process (queue and registry gauges are read from Redis at scrape time)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.http_requests = Counter(
            "gptoss_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=registry
        )
        self.http_duration = Histogram(
            "gptoss_http_request_duration_seconds", "Time to answer an HTTP request",
            ["method", "route"], buckets=HTTP_BUCKETS, registry=registry,
        )  # fmt: skip
        self.jobs_submitted = Counter(
            "gptoss_jobs_submitted", "Jobs accepted onto the incoming queue", ["model"], registry=registry
        )
        self.admission_decisions = Counter(
            "gptoss_admission_decisions", "Admission decisions", ["outcome", "reason"], registry=registry
        )
        self.cache_hits = Counter("gptoss_cache_hits", "Response cache hits", ["model"], registry=registry)
        self.cache_misses = Counter(
            "gptoss_cache_misses", "Response cache misses", ["model"], registry=registry
        )

    def start_at_zero(self, model: str, routes: Iterable[tuple[str, str]] = ()) -> None:
        """Series the rules and the dashboard read, at 0 from the start: the served model's, the
        refusals, and each of `routes` (method, route) with every 5xx status."""
        for counter in (self.jobs_submitted, self.cache_hits, self.cache_misses):
            counter.labels(model)
        for reason in API_REFUSALS:
            self.admission_decisions.labels("refused", reason)
        for method, route in routes:
            for status in SERVER_ERROR_STATUSES:
                self.http_requests.labels(method, route, status)


class SchedulerMetrics:
    """Metrics of the scheduler process."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.admission_decisions = Counter(
            "gptoss_admission_decisions", "Admission decisions", ["outcome", "reason"], registry=registry
        )
        self.routing_decisions = Counter(
            "gptoss_routing_decisions", "Routing decisions", ["queue", "reason"], registry=registry
        )
        self.jobs_terminal = Counter(
            "gptoss_jobs", "Jobs that reached a terminal status", ["model", "status"], registry=registry
        )
        self.jobs_requeued = Counter(
            "gptoss_jobs_requeued",
            "Jobs handed back after their worker was lost",
            ["outcome"],
            registry=registry,
        )
        self.worker_loss_detection = Histogram(
            "gptoss_worker_loss_detection_seconds", "From a worker's last heartbeat to noticing it gone",
            buckets=(1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60), registry=registry,
        )  # fmt: skip
        self.schedule_duration = Histogram(
            "gptoss_scheduling_duration_seconds", "Time to admit and route one job",
            buckets=HTTP_BUCKETS, registry=registry,
        )  # fmt: skip

    def start_at_zero(
        self, model: str, routes: Iterable[tuple[str, str]], admissions: Iterable[tuple[str, str]]
    ) -> None:
        """Series at 0 from the start: the model's terminal statuses, each (queue, reason) of
        `routes` and each (outcome, reason) of `admissions` the scheduler knows."""
        for status in JOB_STATUSES_SCHEDULER:
            self.jobs_terminal.labels(model, status)
        for queue, reason in routes:
            self.routing_decisions.labels(queue, reason)
        for outcome, reason in admissions:
            self.admission_decisions.labels(outcome, reason)


class WorkerMetrics:
    """Metrics of one worker process."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        labels = ["model", "queue"]
        self.ttft = Histogram(
            "gptoss_time_to_first_token_seconds", "Time from the request's arrival to its first token",
            labels, buckets=sla.ttft_buckets(), registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "gptoss_e2e_request_latency_seconds", "Time from the request's arrival to its finished result",
            labels, buckets=sla.e2e_buckets(), registry=registry,
        )  # fmt: skip
        self.itl = BatchHistogram(
            "gptoss_inter_token_latency_seconds", "Time between successive tokens of a request, per token",
            labels, buckets=sla.itl_buckets(), registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "gptoss_request_time_per_output_token_seconds",
            "Mean time per output token of a request after its first (one value per request)",
            labels, buckets=sla.itl_buckets(), registry=registry,
        )  # fmt: skip
        self.queue_time = Histogram(
            "gptoss_request_queue_time_seconds", "Time from the request's arrival to the start of generation",
            labels, buckets=sla.queue_time_buckets(), registry=registry,
        )  # fmt: skip
        self.tokens_per_second = Histogram(
            "gptoss_request_tokens_per_second", "Decode speed of a request (generated tokens per second)",
            labels, buckets=TOKENS_PER_SECOND_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "gptoss_prompt_tokens", "Prompt tokens processed", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "gptoss_generation_tokens", "Tokens generated", labels, registry=registry
        )
        self.jobs_terminal = Counter(
            "gptoss_jobs", "Jobs that reached a terminal status", ["model", "status"], registry=registry
        )
        self.requests_running = Gauge(
            "gptoss_requests_running", "Requests generating now", labels, registry=registry
        )
        self.memory_used = Gauge(
            "gptoss_memory_used_bytes", "Memory in use on the worker's device", ["device"], registry=registry
        )
        self.memory_total = Gauge(
            "gptoss_memory_total_bytes", "Memory budget of the worker's device", ["device"], registry=registry
        )
        self.memory_pressure = Gauge(
            "gptoss_memory_pressure", "Used over total memory of the worker's device (0..1)",
            ["device"], registry=registry,
        )  # fmt: skip
        self.session_hits = Counter(
            "gptoss_session_cache_hits", "Session turns that reused the session's cached KV prefix",
            ["model"], registry=registry,
        )  # fmt: skip
        self.session_misses = Counter(
            "gptoss_session_cache_misses", "Session turns prefilled in full (no cached KV on this worker)",
            ["model"], registry=registry,
        )  # fmt: skip
        self.prefix_tokens_reused = Counter(
            "gptoss_prefix_tokens_reused", "Prompt tokens taken from a session's KV cache, not computed",
            ["model"], registry=registry,
        )  # fmt: skip
        self.worker_cache_hits = Counter(
            "gptoss_worker_cache_hits", "Cacheable jobs a worker answered without generating them: from "
            "the cache as they started (source=cache), or with the result of an identical request it "
            "was decoding (source=identical)", ["model", "source"], registry=registry,
        )  # fmt: skip
        self.session_cache_bytes = Gauge(
            "gptoss_session_cache_bytes", "Bytes of session KV caches the worker holds",
            ["model"], registry=registry,
        )  # fmt: skip
        self.model_load = Gauge(
            "gptoss_model_load_seconds",
            "Seconds the worker took to load its model",
            ["model"],
            registry=registry,
        )

    def start_at_zero(self, model: str, queue: str) -> None:
        """Every series of the served model on this worker's queue, at 0 from the start."""
        labels = (model, queue)
        for metric in (self.ttft, self.e2e, self.tpot, self.queue_time, self.tokens_per_second,
                       self.prompt_tokens, self.generation_tokens, self.requests_running):  # fmt: skip
            metric.labels(*labels)
        self.itl.touch(*labels)
        for status in JOB_STATUSES_WORKER:
            self.jobs_terminal.labels(model, status)
        for counter in (self.session_hits, self.session_misses, self.prefix_tokens_reused):
            counter.labels(model)
        for source in WORKER_CACHE_SOURCES:
            self.worker_cache_hits.labels(model, source)


def worker_metrics(model: str, queue: str, identity: Mapping[str, str]) -> WorkerMetrics:
    """A worker's metrics in a registry of their own, its series at 0 and its process labelled."""
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.start_at_zero(model, queue)
    label_process(metrics.registry, "worker", identity)
    return metrics
