"""The batch feeder's metrics (`gptoss_batch_…`), registered in the scheduler's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import HTTP_BUCKETS

LINE_OUTCOMES = ("completed", "failed", "refused", "expired", "cancelled")
"""How a batch line ends: answered, its job failed, refused before it ran, never run (the batch
expired or was cancelled first)."""

BATCH_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
"""Statuses of batches still at work (the gauge's label values)."""

BATCH_ENDINGS = ("completed", "failed", "expired", "cancelled")


class BatchMetrics:
    """Lines released and finished, batches by status, batch jobs in flight and waiting."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.lines_released = Counter(
            "gptoss_batch_lines_released", "Batch lines released as jobs", registry=registry
        )
        self.lines_finished = Counter(
            "gptoss_batch_lines_finished", "Batch lines written to the output or error file, by outcome",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.batches = Gauge(
            "gptoss_batch_batches", "Batches at work, by status", ["status"], registry=registry
        )
        self.batches_ended = Counter(
            "gptoss_batch_batches_ended", "Batches that ended, by status", ["status"], registry=registry
        )
        self.jobs_in_flight = Gauge(
            "gptoss_batch_jobs_in_flight", "Batch jobs released and not yet settled", registry=registry
        )
        self.jobs_waiting = Gauge(
            "gptoss_batch_jobs_waiting", "Batch jobs released and not started", registry=registry
        )
        self.round_duration = Histogram(
            "gptoss_batch_feeder_round_duration_seconds", "Time of one feeder round",
            buckets=HTTP_BUCKETS, registry=registry,
        )  # fmt: skip
        for outcome in LINE_OUTCOMES:
            self.lines_finished.labels(outcome)
        for status in BATCH_STATUSES:
            self.batches.labels(status)
        for status in BATCH_ENDINGS:
            self.batches_ended.labels(status)
