"""One frozen settings object, read from `GPTOSS_*` variables by each entrypoint and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.redis_settings import RedisSettings

PRODUCTION_SAMPLE_RATIO = 0.03
"""Share of new traces sampled in production (a request can still force its own)."""

DEFAULT_BATCH_SIZE = 8
"""Requests a worker decodes at once when neither GPTOSS_MAX_BATCH_SIZE nor a profile says."""


class Settings(BaseSettings, RedisSettings):
    """Everything a process may be told; nothing else reads the environment (where Redis is, and
    how: `RedisSettings`)."""

    model_config = SettingsConfigDict(env_prefix="GPTOSS_", frozen=True, extra="ignore")

    model: str = Field(
        default="smollm2-135m",
        description="Registry name or alias of the model served; unset: the profile's, else smollm2-135m",
    )
    profile: str | None = Field(
        default=None, description="Serving profile (latency_first, balanced, quality_first); unset: none"
    )
    model_path: Path | None = Field(
        default=None, description="Local folder of a hub model's weights (instead of downloading its hub id)"
    )
    tiktoken_dir: Path | None = Field(
        default=None, description="Folder of o200k_base.tiktoken for harmony (default <cache_dir>/tiktoken)"
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "gptoss",
        description="Converted and generated model weights (default ~/.cache/gptoss)",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path.home() / ".local" / "share" / "gptoss",
        description="State of `gptoss up`, its Redis data (default ~/.local/share/gptoss)",
    )

    api_host: str = Field(default="127.0.0.1", description="Address the API binds")
    api_port: int = Field(default=8000, description="Port the API binds")
    api_processes: int = Field(
        default=1,
        ge=1,
        description="API processes (gunicorn workers) on this host; more where the CPU allows",
    )
    api_worker_class: Literal["gevent", "gthread"] = Field(
        default="gevent",
        description="gunicorn worker of the API: gevent (a stream or a waiting request costs a greenlet) "
        "or gthread (a thread each, at most api_threads at once)",
    )
    api_connections: int = Field(
        default=4000, ge=1, description="Connections one API process serves at once (gevent worker)"
    )
    api_threads: int = Field(
        default=16, ge=1, description="Request threads of the API process (gthread worker)"
    )
    api_head_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client may take to send a request's head, or stay idle between requests",
    )
    api_idle_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a socket read or write of a request's body or answer may wait on the client",
    )
    api_active_requests: int = Field(
        default=32,
        ge=1,
        description="Requests one API process works on at once; others wait their turn (streams and "
        "waiting completions hold none while they wait)",
    )
    api_streams_per_tenant: int = Field(
        default=256,
        ge=1,
        description="Streams (SSE, streamed or waiting completions) one tenant may hold open per API process",
    )
    api_redis_budget: float = Field(
        default=1.5,
        gt=0,
        description="Seconds one API request may wait on Redis, all its commands together (then 503)",
    )
    api_url: str = Field(default="http://127.0.0.1:8000", description="API that `gptoss submit` calls")
    max_body_bytes: int = Field(default=1_000_000, description="Largest request body (413 above)")

    default_max_tokens: int = Field(default=256, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(default=4096, description="Largest max_tokens a request may ask for")
    multi_gpu_threshold: int = Field(
        default=8000, description="Prompts with more tokens than this go to gpu-multi"
    )
    job_max_retries: int = Field(
        default=2, description="Times a job whose worker died is put back on its queue before it fails"
    )
    shutdown_grace: float = Field(
        default=30.0, description="Seconds a stopping worker lets its job finish before handing it back"
    )
    job_timeout: int = Field(default=600, description="Seconds one generation may run")

    worker_queue: Literal["gpu-single", "gpu-multi"] = Field(
        default="gpu-single", description="Queue a worker listens on"
    )
    device: str | None = Field(default=None, description="Worker device (cuda:N, cpu); unset: cuda:0 if any")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Dtype workers compute in; auto: the model's (float32 on a batching CPU without bf16)",
    )
    torch_threads: int | None = Field(default=None, description="CPU threads per worker (torch default)")
    ignore_eos: bool = Field(
        default=False,
        description="Bench only: end tokens do not end a completion (every request makes its max_tokens)",
    )
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Requests a worker decodes at once; unset: the profile's, else 8"
    )
    batch_reserved_slots: int | None = Field(
        default=None,
        ge=0,
        description="Slots of a worker's batch that a batch's lines never take (kept for interactive "
        "requests; at most the batch size - 1); unset: a quarter of the batch size, at least 1",
    )
    prefill_chunk: int = Field(
        default=512,
        ge=0,
        description="Prompt tokens a worker prefills per step beside its decoding rows; 0: all at once",
    )
    kv_cache_budget_bytes: int | None = Field(
        default=None, ge=1, description="Bytes a worker's batch KV cache may reach; unset: 25% of its memory"
    )
    tp_timeout: int = Field(
        default=7 * 24 * 3600, description="Seconds tensor-parallel ranks wait for each other (idle included)"
    )
    heartbeat_interval: float = Field(default=1.0, description="Seconds between heartbeats")
    heartbeat_ttl: int = Field(default=5, description="Seconds a heartbeat stays live")

    memory_warn: float = Field(
        default=0.85, description="Memory pressure at which workers take no long prompt"
    )
    memory_critical: float = Field(
        default=0.95, description="Memory pressure at which workers take nothing new"
    )
    memory_budget_bytes: int | None = Field(
        default=None, description="CPU workers: bytes the process may use (unset: the machine's memory)"
    )
    memory_reading_file: Path | None = Field(
        default=None, description="Read the worker's memory from this JSON file ({used, total}); for tests"
    )
    long_prompt_tokens: int = Field(default=2000, description="Prompts over this are long (refused at warn)")
    hold_timeout: float = Field(default=120.0, description="Seconds a held job waits before it is rejected")
    backlog_budget: int = Field(
        default=1000, description="Jobs waiting in all queues before the API answers 429"
    )
    tenant_backlog_budget: int = Field(
        default=200, description="Jobs one tenant may have waiting before the API answers it 429"
    )
    tenant_weights: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="Weights of tenants in fair sharing of queue order and batch slots, as"
        " `acme=3,free=1`; a tenant not named weighs 1",
    )
    result_ttl: int = Field(
        default=24 * 3600, ge=1, description="Seconds a job, its result and its event stream are kept"
    )
    idempotency_ttl: int = Field(
        default=24 * 3600, ge=1, description="Seconds an Idempotency-Key keeps answering with its job"
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Signing secret of webhooks (whsec_<base64> or raw); unset: webhooks off"
    )
    webhook_allow_private: bool = Field(
        default=False, description="Allow webhooks to loopback, private and link-local addresses"
    )
    webhook_attempts: int = Field(default=5, ge=1, description="Deliveries tried per webhook")
    webhook_backoff: float = Field(
        default=1.0, ge=0, description="Seconds before the first webhook retry (doubling after)"
    )
    webhook_timeout: float = Field(default=10.0, gt=0, description="Seconds one webhook delivery may take")

    response_cache: bool = Field(
        default=True, description="Answer deterministic requests (greedy or seeded) seen before from Redis"
    )
    response_cache_ttl: int = Field(
        default=3600, ge=1, description="Seconds a cached response lives after its last use"
    )
    response_cache_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1, description="Bytes all cached responses may take (LRU beyond)"
    )
    response_cache_shared: bool = Field(
        default=False,
        description="Share cached responses across tenants (off: each tenant has its own entries)",
    )
    weights_version: str = Field(
        default="",
        description="Your name for the served weights' version, part of every response-cache key",
    )
    session_cache_bytes: int | None = Field(
        default=None, ge=0, description="Bytes of session KV caches a worker keeps; unset: 10% of its memory"
    )
    session_ttl: int = Field(
        default=600, ge=1, description="Seconds a session's KV cache and worker affinity live after a turn"
    )

    auth: bool = Field(
        default=True,
        description="Require an API key (Authorization: Bearer) on the API; off for local development",
    )
    api_key: SecretStr | None = Field(default=None, description="Key `gptoss submit` sends as a client")
    metrics_auth: bool = Field(default=False, description="Require the admin key on the API's /metrics")
    rate_limit_requests: int = Field(default=600, description="Requests per minute a tenant may make")
    rate_limit_tokens: int = Field(
        default=2_000_000, description="Tokens (prompt + max_tokens) per minute a tenant may ask for"
    )
    admin_key: SecretStr | None = Field(
        default=None, description="Bearer key for /admin/*; unset: admin endpoints are refused"
    )
    rq_dashboard_writable: bool = Field(
        default=False, description="Let rq-dashboard at /admin/rq requeue, delete and empty (off: read-only)"
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address the scheduler's and workers' /metrics bind"
    )
    scheduler_metrics_port: int = Field(default=9101, description="Port of the scheduler's /metrics (0: off)")
    worker_metrics_port: int = Field(default=9102, description="Port of a worker's /metrics (0: off)")

    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint"),
        description="OTLP/HTTP endpoint for traces (standard OTEL_ variable); unset: no export",
    )
    otel_service_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_SERVICE_NAME", "otel_service_name"),
        description="Service name on spans (standard OTEL_ variable); unset: gptoss-<process>",
    )
    environment: Literal["development", "production"] = Field(
        default="development", description="development: trace every request; production: sample 3%"
    )
    trace_sample_ratio: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Head sampling ratio of new traces; unset: by environment"
    )
    trace_dir: Path | None = Field(
        default=None,
        description="Also write finished spans to <dir>/<process>-<pid>.jsonl, one JSON per line",
    )
    observability: bool = Field(
        default=True, description="Metrics and tracing; off only to measure what they cost"
    )
    cluster: str = Field(
        default="local",
        min_length=1,
        description="Cluster this process runs in: on every log line, span (resource attribute) and"
        " gptoss_process_info; the same value as Prometheus's external label `cluster`",
    )
    region: str = Field(
        default="local",
        min_length=1,
        description="Region this process runs in (as `cluster`, label `region`)",
    )
    instance: str | None = Field(
        default=None, description="Name of this machine or pod in telemetry; unset: the host name"
    )

    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a TTY, JSON otherwise"
    )
    log_level: str = Field(default="info", description="Lowest level logged")
    log_content: bool = Field(default=False, description="Log prompt and completion text (off: never logged)")

    file_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1, description="Largest file a tenant may upload (413 above)"
    )
    file_max_lines: int = Field(default=50_000, ge=1, description="Most lines (requests) of one batch file")
    file_ttl: int = Field(
        default=30 * 24 * 3600,
        ge=3600,
        description="Seconds an uploaded batch file lives unless it asks for less",
    )
    tenant_file_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Bytes of files (uploads and batch outputs) a tenant may hold",
    )
    tenant_files: int = Field(default=100, ge=1, description="Files (uploads and outputs) a tenant may hold")
    tenant_batches: int = Field(default=10, ge=1, description="Batches a tenant may have at work at once")
    batch_ttl: int = Field(
        default=30 * 24 * 3600, ge=3600, description="Seconds a batch, its output and error files live"
    )
    batch_jobs_in_flight: int = Field(
        default=64, ge=1, description="Batch jobs released and not finished, all tenants together"
    )
    batch_tenant_jobs_in_flight: int = Field(
        default=32, ge=1, description="Batch jobs of one tenant released and not finished (its batch quota)"
    )
    batch_jobs_waiting: int = Field(
        default=16, ge=1, description="Batch jobs waiting for a worker at once; the feeder releases no more"
    )
    batch_feeder_interval: float = Field(
        default=0.25, gt=0, description="Seconds between two rounds of the scheduler's batch feeder"
    )

    @field_validator("tenant_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        # `acme=3,free=1` from the environment; a mapping given in code passes as it is.
        if not isinstance(value, str):
            return value
        pairs = [part.partition("=") for part in value.split(",") if part.strip()]
        if any(not sep or not name.strip() for name, sep, _ in pairs):
            raise ValueError(f"tenant weights must read `tenant=weight,...`, not {value!r}")
        return {name.strip(): weight.strip() for name, _, weight in pairs}

    @field_validator("tenant_weights")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        if bad := sorted(t for t, w in value.items() if not 0 < w < float("inf")):
            raise ValueError(f"tenant weights must be positive and finite: {', '.join(bad)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _model_from_profile(cls, data: Any) -> Any:
        # The profile names a default model; an explicit GPTOSS_MODEL (or alias) still wins.
        from shared.profiles import profile_named
        from shared.registry import canonical_name

        if isinstance(data, dict):
            if data.get("model") is None and data.get("profile"):
                data = {**data, "model": profile_named(data["profile"]).model}
            if data.get("model"):
                data = {**data, "model": canonical_name(data["model"])}
        return data

    def batch_size(self) -> int:
        """Requests a worker decodes at once: as set, else the profile's, else DEFAULT_BATCH_SIZE."""
        from shared.profiles import profile_named

        if self.max_batch_size is not None:
            return self.max_batch_size
        return profile_named(self.profile).batch_size if self.profile else DEFAULT_BATCH_SIZE

    def vocab_dir(self) -> Path:
        """Folder of harmony's o200k vocabulary."""
        return self.tiktoken_dir or self.cache_dir / "tiktoken"

    def sample_ratio(self) -> float:
        """The head sampling ratio: as set, else 100% in development and 3% in production."""
        if self.trace_sample_ratio is not None:
            return self.trace_sample_ratio
        return PRODUCTION_SAMPLE_RATIO if self.environment == "production" else 1.0

    def telemetry_identity(self) -> dict[str, str]:
        """Where this process runs, as every metric, span and log line names it: cluster, region,
        instance."""
        import socket

        return {
            "cluster": self.cluster,
            "region": self.region,
            "instance": self.instance or socket.gethostname(),
        }
