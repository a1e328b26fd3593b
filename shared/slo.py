"""Service-level objectives with error budgets, from the one source of targets (`shared/sla.py`:
`shared/models.toml` per model, `shared/sla.toml` service-wide and its `[slo]` table).

API (what `shared/slo_rules.py` renders from):

- `Slo(name, model, objective, threshold_s)` — one objective: `ttft` (per model: the share of
  requests whose time to first token is within `threshold_s`, the model's `ttft_sla_s`), `errors`
  (per model: the share of the jobs that ran that did not fail) or `availability` (the API's share
  of answers without a server error; no model). `budget` is the share that may miss it.
- `SloConfig(window_days, ttft_objective)` and `slo_config(text=None)` — `[slo]` of `sla.toml`.
- `slos(targets=None, service=None, config=None) -> list[Slo]` — every objective, in render order.
- `Tier(alert, long, short, factor, severity)` and `TIERS` — the multi-window, multi-burn-rate alerts
  of Google's SRE workbook (ch. 5): page at 14.4x over 1h and 5m (2% of a 30-day budget in an hour)
  and 6x over 6h and 30m (5% in six hours), open a ticket at 1x over 3d and 6h.
- `WINDOWS` — the burn-rate windows recorded, `window_seconds(window)` — one as seconds.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from shared import sla
from shared.sla import ServiceTargets, SlaTarget

SloName = Literal["ttft", "errors", "availability"]

WINDOWS = ("5m", "30m", "1h", "6h", "3d")
"""The windows a burn rate is recorded over: the long and short window of every tier."""

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Slo:
    """One objective: what share of events must be good (`objective`), for one model or the API."""

    name: SloName
    model: str | None
    objective: float
    threshold_s: float | None = None

    @property
    def budget(self) -> float:
        """The share of events that may be bad over the window (1 - objective)."""
        return round(1 - self.objective, 12)


@dataclass(frozen=True)
class Tier:
    """One multi-window alert: both windows burn the budget faster than `factor` times the rate that
    spends it exactly over the SLO window."""

    alert: str
    long: str
    short: str
    factor: float
    severity: str
    action: str


TIERS = (
    Tier("GptossErrorBudgetFastBurn", "1h", "5m", 14.4, "critical", "page"),
    Tier("GptossErrorBudgetBurn", "6h", "30m", 6, "critical", "page"),
    Tier("GptossErrorBudgetSlowBurn", "3d", "6h", 1, "warning", "ticket"),
)
"""Each short window is a twelfth of its long one: the alert stops soon after the burn does."""


@dataclass(frozen=True)
class SloConfig:
    """`[slo]` of sla.toml: the budget's window (days) and the TTFT objective (a share)."""

    window_days: int
    ttft_objective: float

    @property
    def window(self) -> str:
        """The SLO window as a Prometheus duration."""
        return f"{self.window_days}d"


def slo_config(text: str | None = None) -> SloConfig:
    """`[slo]` of `shared/sla.toml` (or of `text`, in its format)."""
    if text is None:
        text = resources.files("shared").joinpath("sla.toml").read_text()
    table = tomllib.loads(text).get("slo", {})
    days, objective = table.get("window_days"), table.get("ttft_objective")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 90:
        raise ValueError(f"sla.toml: [slo] window_days must be a whole number of days (1-90), not {days!r}")
    if isinstance(objective, bool) or not isinstance(objective, int | float) or not 0 < objective < 1:
        raise ValueError(f"sla.toml: [slo] ttft_objective must be a share between 0 and 1, not {objective!r}")
    fastest = max(tier.factor for tier in TIERS)
    if 1 / (1 - objective) <= fastest:  # even every first token slow would not page
        raise ValueError(
            f"sla.toml: [slo] ttft_objective {objective} leaves a budget no {fastest}x burn can spend"
        )
    return SloConfig(days, float(objective))


def slos(
    targets: dict[str, SlaTarget] | None = None,
    service: ServiceTargets | None = None,
    config: SloConfig | None = None,
) -> list[Slo]:
    """Every objective: TTFT per model, job errors per model, then the API's availability."""
    targets = targets if targets is not None else sla.sla_targets()
    service = service if service is not None else sla.service_targets()
    config = config if config is not None else slo_config()
    found = [Slo("ttft", m, config.ttft_objective, t.ttft_s) for m, t in sorted(targets.items())]
    found += [Slo("errors", m, round(1 - service.error_budget, 12)) for m in sorted(targets)]
    return [*found, Slo("availability", None, service.availability)]


def window_seconds(window: str) -> int:
    """A Prometheus duration of one unit ("5m", "3d") in seconds."""
    return int(window[:-1]) * UNITS[window[-1]]
