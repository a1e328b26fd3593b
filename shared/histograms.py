"""A Prometheus histogram observed many values at a time: a request's token gaps in one call.

prometheus_client's `Histogram.observe` takes a lock per value; observing every gap between a
request's tokens that way costs a lock per generated token. `BatchHistogram.observe_many` counts a
whole request's gaps into the buckets under one lock, and serves them as an ordinary histogram
(exemplars included) from its own collector.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString


@dataclass
class _Series:
    """One label set's bucket counts (not cumulative), sum and latest exemplar per bucket."""

    counts: list[int]
    total: float = 0.0
    exemplars: dict[int, Exemplar] = field(default_factory=dict)


class BatchHistogram(Collector):
    """A labelled histogram whose values arrive in batches (one lock per batch, not per value)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        bounds = sorted(float(b) for b in buckets)
        self._bounds = bounds if bounds and bounds[-1] == math.inf else [*bounds, math.inf]
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        if registry is not None:
            registry.register(self)

    def touch(self, *labels: str) -> None:
        """Make the series of `labels` exist (at 0), so it is scraped before its first value."""
        with self._lock:
            self._get(labels)

    def observe_many(
        self, labels: Sequence[str], values: Iterable[float], exemplar: dict[str, str] | None = None
    ) -> None:
        """Count every one of `values` into the series of `labels`; with `exemplar`, the largest value
        carries it (the slowest gap is the one worth opening the trace for)."""
        bounds = self._bounds
        counted: dict[int, int] = {}
        total, worst = 0.0, -math.inf
        for value in values:
            index = bisect.bisect_left(bounds, value)
            counted[index] = counted.get(index, 0) + 1
            total += value
            worst = max(worst, value)
        if not counted:
            return
        with self._lock:
            series = self._get(tuple(labels))
            for index, count in counted.items():
                series.counts[index] += count
            series.total += total
            if exemplar:
                index = bisect.bisect_left(bounds, worst)
                series.exemplars[index] = Exemplar(exemplar, worst, time.time())

    def _get(self, labels: tuple[str, ...]) -> _Series:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, not {labels}")
        if (series := self._series.get(labels)) is None:
            series = self._series[labels] = _Series([0] * len(self._bounds))
        return series

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(k, list(s.counts), s.total, dict(s.exemplars)) for k, s in self._series.items()]
        for labels, counts, total, exemplars in snapshot:
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            cumulative = 0
            for index, (bound, count) in enumerate(zip(self._bounds, counts, strict=True)):
                cumulative += count
                le = floatToGoString(bound)
                example = exemplars.get(index)
                buckets.append((le, cumulative, example) if example is not None else (le, cumulative))
            family.add_metric(list(labels), buckets, total)
        yield family
