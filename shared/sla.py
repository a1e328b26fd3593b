"""The service-level targets, from one source: the model registry (`shared/models.toml`) for each
model's latency targets, and `shared/sla.toml` for the service-wide ones (error budget, availability).

API (what alert rendering, buckets, benches and tests call):

- `SlaTarget(model, ttft_s, e2e_s)` — one model's targets, in seconds: time to first token p95 and
  end-to-end latency p95 (submission to result), as the alerts compare them.
- `sla_targets(registry=None) -> dict[str, SlaTarget]` — every registry model's targets, by model
  name (the `model` label of the `gptoss_` latency histograms). `registry` defaults to the packaged
  `models.toml` (`shared.registry.load_registry()`).
- `thresholds(kind, targets=None) -> tuple[float, ...]` — the distinct thresholds of `kind`
  (`"ttft"` or `"e2e"`), ascending.
- `ttft_buckets()`, `e2e_buckets()`, `queue_time_buckets()`, `itl_buckets()` — histogram buckets
  (seconds) that hold every threshold as a bucket edge, so `histogram_quantile` is exact at the
  threshold and an alert cannot fire while the SLA is met (issue #21). `metrics.py` builds its
  histograms from these, so buckets and thresholds cannot drift apart.
- `check_profiles(profiles=None, targets=None) -> list[str]` — how each serving profile breaks the
  rule below (empty when none does).
- `ServiceTargets(error_budget, error_for_minutes, availability, availability_for_minutes)` and
  `service_targets(text=None)` — `shared/sla.toml`: the share of the jobs that ran that may fail
  (per model; `GptossErrorRatioHigh`), the share of the API's answers without a server error
  (`GptossAvailabilityLow`), and how long each must be breached before its alert fires. `text`
  defaults to the packaged file; a share outside (0, 1) or a hold under a minute is refused.

How profiles relate: a model's entry is the fleet's target for that model, because the latency
series are labelled by model, not profile. A profile (`shared/profiles.toml`) names a model and
carries per-request targets: its `ttft_sla_s` equals its model's (the TTFT of a model does not
depend on how long its answer is), and its `e2e_sla_s` is at most its model's `e2e_sla_s` (a
model's E2E target is the loosest of the profiles that serve it; `latency_first` asks less).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from shared.profiles import Profile, load_profiles
from shared.registry import ModelSpec, canonical_name, load_registry

Kind = Literal["ttft", "e2e"]

TTFT_BASE = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5,
             3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
"""vLLM's small time-to-first-token buckets, then half-second steps around the SLAs (seconds)."""

E2E_BASE = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 40.0,
            50.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 480.0)  # fmt: skip
"""End-to-end latency buckets (seconds), before the SLA thresholds are added."""

ITL_BASE = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
            0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
"""Inter-token latency buckets (seconds): vLLM's, with finer steps where decode usually sits."""


@dataclass(frozen=True)
class SlaTarget:
    """One model's service-level targets (seconds, compared against the p95)."""

    model: str
    ttft_s: float
    e2e_s: float


def sla_targets(registry: dict[str, ModelSpec] | None = None) -> dict[str, SlaTarget]:
    """Every registry model's targets, by model name."""
    registry = registry if registry is not None else load_registry()
    return {name: SlaTarget(name, spec.ttft_sla_s, spec.e2e_sla_s) for name, spec in registry.items()}


def thresholds(kind: Kind, targets: dict[str, SlaTarget] | None = None) -> tuple[float, ...]:
    """The distinct thresholds of `kind` over all models, ascending."""
    targets = targets if targets is not None else sla_targets()
    values = {t.ttft_s if kind == "ttft" else t.e2e_s for t in targets.values()}
    return tuple(sorted(values))


def with_edges(base: tuple[float, ...], *edges: float) -> tuple[float, ...]:
    """`base` with every one of `edges` added as a bucket edge, ascending and without repeats."""
    return tuple(sorted({float(b) for b in base} | {float(e) for e in edges}))


def ttft_buckets(targets: dict[str, SlaTarget] | None = None) -> tuple[float, ...]:
    """Time-to-first-token buckets: every TTFT threshold is an edge."""
    return with_edges(TTFT_BASE, *thresholds("ttft", targets))


def e2e_buckets(targets: dict[str, SlaTarget] | None = None) -> tuple[float, ...]:
    """End-to-end latency buckets: every E2E threshold is an edge."""
    return with_edges(E2E_BASE, *thresholds("e2e", targets))


def queue_time_buckets(targets: dict[str, SlaTarget] | None = None) -> tuple[float, ...]:
    """Queue-time buckets: queue time is the first part of TTFT, so the TTFT thresholds are edges too."""
    return with_edges(E2E_BASE, *thresholds("ttft", targets), *thresholds("e2e", targets))


def itl_buckets() -> tuple[float, ...]:
    """Inter-token latency buckets (no ITL target yet; a threshold would be added here as an edge)."""
    return ITL_BASE


def check_profiles(
    profiles: dict[str, Profile] | None = None, targets: dict[str, SlaTarget] | None = None
) -> list[str]:
    """Each way a profile's targets break the rule in this module's docstring (empty when none do)."""
    profiles = profiles if profiles is not None else load_profiles()
    registry = load_registry()
    targets = targets if targets is not None else sla_targets(registry)
    problems = []
    for profile in profiles.values():
        target = targets.get(canonical_name(profile.model, registry))
        if target is None:
            problems.append(f"profile {profile.name}: model {profile.model} is not in the registry")
            continue
        if profile.ttft_sla_s != target.ttft_s:
            problems.append(f"profile {profile.name}: ttft_sla_s {profile.ttft_sla_s} != {target.ttft_s}")
        if profile.e2e_sla_s > target.e2e_s:
            problems.append(f"profile {profile.name}: e2e_sla_s {profile.e2e_sla_s} > {target.e2e_s}")
    return problems


@dataclass(frozen=True)
class ServiceTargets:
    """The service-wide targets (shares between 0 and 1) and how long each may be missed (minutes)."""

    error_budget: float
    error_for_minutes: int
    availability: float
    availability_for_minutes: int


def service_targets(text: str | None = None) -> ServiceTargets:
    """The service-wide targets of `shared/sla.toml` (or of `text`, in its format)."""
    if text is None:
        text = resources.files("shared").joinpath("sla.toml").read_text()
    data = tomllib.loads(text)
    return ServiceTargets(
        error_budget=_share(data, "job_errors", "budget"),
        error_for_minutes=_minutes(data, "job_errors"),
        availability=_share(data, "availability", "objective"),
        availability_for_minutes=_minutes(data, "availability"),
    )


def _share(data: dict[str, Any], table: str, key: str) -> float:
    value = data.get(table, {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"sla.toml: [{table}] {key} must be a share between 0 and 1, not {value!r}")
    return float(value)


def _minutes(data: dict[str, Any], table: str) -> int:
    value = data.get(table, {}).get("for_minutes")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sla.toml: [{table}] for_minutes must be a whole number of minutes, not {value!r}")
    return value
