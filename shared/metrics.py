"""The Prometheus metric catalogue: every `gptoss_` metric, built per process into its own registry.

Names follow what vLLM users know (time to first token, e2e latency, inter-token latency, queue
time, prompt/generation token counters). Labels stay low-cardinality: model, queue, route, status,
outcome, reason — never job ids. Histograms carry exemplars with the trace id when served as
OpenMetrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
"""vLLM's time-to-first-token buckets (seconds)."""

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0)  # fmt: skip
"""End-to-end and queue-time buckets (seconds)."""

ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5)  # fmt: skip
"""Inter-token latency buckets (seconds)."""

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""API request duration buckets (seconds)."""

TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Per-request decode speed buckets (tokens per second)."""


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


class WorkerMetrics:
    """Metrics of one worker process."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        labels = ["model", "queue"]
        self.ttft = Histogram(
            "gptoss_time_to_first_token_seconds", "Time from submission to the first generated token",
            labels, buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "gptoss_e2e_request_latency_seconds", "Time from submission to the finished result",
            labels, buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "gptoss_inter_token_latency_seconds", "Mean time between generated tokens of a request",
            labels, buckets=ITL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_time = Histogram(
            "gptoss_request_queue_time_seconds", "Time from submission to the start of generation",
            labels, buckets=LATENCY_BUCKETS, registry=registry,
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
