"""The figures a serving benchmark reads from its requests, as pure functions over plain data: what
one streamed request saw (`Outcome`), percentiles, inter-token latencies from chunk arrival times,
and one load level's summary (throughput, TTFT, ITL, E2E, goodput under an SLO)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Slo:
    """Latency targets a request must meet to count as good, and where they were read."""

    ttft_s: float
    e2e_s: float
    source: str


@dataclass
class Outcome:
    """One streamed request as the client saw it: when it was sent, when each chunk with text
    arrived (seconds, one clock), when the stream ended, and the output tokens the server reported."""

    prompt_id: str
    sent: float
    chunks: list[float] = field(default_factory=list)
    ended: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    response_id: str | None = None
    """The `id` of the stream's chunks (ours: `chatcmpl-<job id>`)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.ended is not None and bool(self.chunks)

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first chunk with text."""
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def e2e(self) -> float | None:
        """Seconds from sending to the end of the stream."""
        return self.ended - self.sent if self.ended is not None else None

    def tokens(self) -> int:
        """Output tokens: the server's count when it gave one, else one per chunk with text."""
        return self.output_tokens if self.output_tokens is not None else len(self.chunks)

    def tpot(self) -> float | None:
        """Seconds per output token after the first (None with fewer than two tokens)."""
        if not self.ok or self.tokens() < 2:
            return None
        assert self.e2e is not None and self.ttft is not None
        return (self.e2e - self.ttft) / (self.tokens() - 1)

    def record(self, start: float) -> dict[str, Any]:
        """The request as kept in the JSON record: times in seconds from `start`, each chunk's time
        from the request's send (to the 0.1 ms)."""
        fields = asdict(self)
        fields.update(sent=self.sent - start, ended=None if self.ended is None else self.ended - start,
                      ttft=self.ttft, e2e=self.e2e,
                      chunks=[round(t - self.sent, 4) for t in self.chunks])  # fmt: skip
        return fields


def percentile(values: list[float], q: float) -> float | None:
    """The `q` quantile (0..1) of `values`, linearly interpolated (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def gaps(times: list[float]) -> list[float]:
    """Seconds between consecutive chunk arrivals: one request's inter-token latencies (chunks that
    came in one read count as gaps of about zero, as a client sees them)."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Send times (seconds from the start) of `count` requests arriving as a Poisson process of
    `rate` per second: the first at 0, then exponential gaps drawn from `seed`."""
    rng, at, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(at)
        at += rng.expovariate(rate)
    return times


def summarise(outcomes: list[Outcome], slo: Slo) -> dict[str, Any]:
    """One load level: requests and output tokens per second over the span from the first send to
    the last end, TTFT / ITL / TPOT / E2E p50 and p95 of the requests that succeeded (ITL pooled
    over every gap of every request), and goodput: the requests that met both SLO targets."""
    done = [o for o in outcomes if o.ok]
    first = min((o.sent for o in outcomes), default=0.0)
    span = max((o.ended or o.sent for o in outcomes), default=0.0) - first
    tokens = sum(o.tokens() for o in done)
    ttft = [o.ttft for o in done if o.ttft is not None]
    e2e = [o.e2e for o in done if o.e2e is not None]
    itl = [g for o in done for g in gaps(o.chunks)]
    tpot = [t for o in done if (t := o.tpot()) is not None]
    ttft_ok = [o for o in done if o.ttft is not None and o.ttft <= slo.ttft_s]
    good = [o for o in ttft_ok if o.e2e is not None and o.e2e <= slo.e2e_s]
    per_second = (lambda n: n / span) if span > 0 else (lambda n: 0.0)

    def p(values: list[float]) -> dict[str, float | None]:
        return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95)}

    return {
        "requests": len(outcomes), "succeeded": len(done), "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5], "seconds": span,
        "requests_per_second": per_second(len(done)), "output_tokens": tokens,
        "output_tokens_per_second": per_second(tokens),
        "ttft_s": p(ttft), "itl_s": p(itl), "tpot_s": p(tpot), "e2e_s": p(e2e),
        "ttft_met": len(ttft_ok) / len(outcomes) if outcomes else 0.0,
        "e2e_met": sum(1 for o in done if o.e2e is not None and o.e2e <= slo.e2e_s) / len(outcomes)
        if outcomes else 0.0,
        "goodput_fraction": len(good) / len(outcomes) if outcomes else 0.0,
        "goodput_requests_per_second": per_second(len(good)),
    }  # fmt: skip
