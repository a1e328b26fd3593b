"""The error-budget rules and dashboard panels, rendered from the objectives of `shared/slo.py`.

`compose/prometheus/rules/slo.yml` records, per objective, the burn rate over each window of
`slo.WINDOWS` (the share of bad events divided by the budget: 1 spends the budget exactly over the
SLO window) and the budget left over the SLO window (1 - the burn rate over it), and alerts on two
windows at once as Google's SRE workbook does (`slo.TIERS`). The Grafana dashboard's panels with ids
from `FIRST_PANEL_ID` are rendered here too. `scripts/render-rules` writes every generated file
(`shared/sla_rules.rendered()`); `scale` divides every window, so a live test sees an hour in a
minute (the rules are otherwise the same).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prometheus_client.utils import floatToGoString

from shared import slo
from shared.slo import Slo, SloConfig, Tier

RULES_FILE = Path("compose/prometheus/rules/slo.yml")
DASHBOARD_FILE = Path("compose/grafana/dashboards/gptoss.json")

FIRST_PANEL_ID = 100
"""Dashboard panels with this id or more are generated; the others are written by hand."""

NOT_CLIENT_ROUTES = '"/healthz|/readyz|/metrics"'
"""Probes and scrapes: their answers are not the API's service to a client."""

GENERATED = (
    "# Generated from shared/models.toml and shared/sla.toml by scripts/render-rules"
    " (shared/slo_rules.py): do not edit."
)


def number(value: float) -> str:
    """A number as PromQL and the labels write it: 14.4 -> "14.4", 6.0 -> "6"."""
    return f"{value:.10g}"


def scaled(window: str, scale: int) -> str:
    """`window` divided by `scale` (a Prometheus duration; in seconds when scaled)."""
    if scale == 1:
        return window
    seconds, rest = divmod(slo.window_seconds(window), scale)
    if rest or not seconds:
        raise ValueError(f"window {window} is not a whole number of seconds when divided by {scale}")
    return f"{seconds}s"


def bad_share(name: str, objectives: list[Slo], window: str) -> str:
    """PromQL: per model (or for the API), the share of the events of objective `name` over `window`
    that missed it."""
    if name == "ttft":
        # A first token is good when it is within its model's threshold: the `le` bucket of the
        # threshold (an edge, shared/sla.py), for the models of each threshold in turn.
        by_threshold: dict[float, list[str]] = {}
        for o in objectives:
            if o.name == "ttft" and o.threshold_s is not None and o.model is not None:
                by_threshold.setdefault(o.threshold_s, []).append(o.model)
        good = " or ".join(
            f'rate(gptoss_time_to_first_token_seconds_bucket{{le="{floatToGoString(t)}", '
            f'model=~"{"|".join(sorted(models))}"}}[{window}])'
            for t, models in sorted(by_threshold.items())
        )
        every = f"sum by (cluster, model) (rate(gptoss_time_to_first_token_seconds_count[{window}]))"
        return f"(1 - sum by (cluster, model) ({good}) / {every})"
    if name == "errors":
        # Rejections are the client's (the scheduler refused the job), not failures.
        return (
            f'sum by (cluster, model) (rate(gptoss_jobs_total{{status="failed"}}[{window}]))'
            f' / sum by (cluster, model) (rate(gptoss_jobs_total{{status=~"finished|failed"}}[{window}]))'
        )
    clients = f"route!~{NOT_CLIENT_ROUTES}"
    return (
        f'sum by (cluster) (rate(gptoss_http_requests_total{{status=~"5..", {clients}}}[{window}]))'
        f" / sum by (cluster) (rate(gptoss_http_requests_total{{{clients}}}[{window}]))"
    )


def budgets(objectives: list[Slo]) -> dict[str, float]:
    """Each objective's budget by name (one per name: the TTFT objective is the same for every model)."""
    found: dict[str, float] = {}
    for o in objectives:
        if found.setdefault(o.name, o.budget) != o.budget:
            raise ValueError(f"the {o.name} objectives differ between models")
    return found


def record(name: str, expr: str, slo_name: str) -> list[str]:
    """One recording rule, labelled with its objective."""
    return [
        f"      - record: {name}",
        f"        expr: {expr}",
        "        labels:",
        f"          slo: {slo_name}",
    ]


def summary(tier: Tier, config: SloConfig) -> str:
    """The alert's summary template (no $value: promtool's tests compare the rendered text)."""
    return (
        "The {{ $labels.slo }} SLO{{ with $labels.model }} of {{ . }}{{ end }} burns its"
        f" {config.window_days}-day error budget over {number(tier.factor)} times as fast as it may"
        f" ({tier.long} and {tier.short}): {tier.action}"
    )


def render_rules(objectives: list[Slo] | None = None, config: SloConfig | None = None, scale: int = 1) -> str:
    """compose/prometheus/rules/slo.yml: burn rates, budgets left, then the multi-window alerts."""
    config = config if config is not None else slo.slo_config()
    objectives = objectives if objectives is not None else slo.slos(config=config)
    lines = [
        GENERATED,
        "# Per objective (shared/sla.toml [slo]): the burn rate over each window (the share of bad",
        "# events over the budget; 1 spends the budget exactly over the SLO window), the budget left",
        "# over the SLO window, and the SRE workbook's multi-window, multi-burn-rate alerts.",
        "# A TTFT threshold is a bucket edge of the histogram (shared/sla.py), so `le` counts it exactly.",
        "groups:",
        "  - name: gptoss-slo-recording",
        "    rules:",
    ]
    for window in slo.WINDOWS:
        for name, budget in budgets(objectives).items():
            expr = f"{bad_share(name, objectives, scaled(window, scale))} / {number(budget)}"
            lines += record(f"gptoss:slo_burn_rate:rate{window}", expr, name)
    for name, budget in budgets(objectives).items():
        expr = f"1 - {bad_share(name, objectives, scaled(config.window, scale))} / {number(budget)}"
        lines += record(f"gptoss:slo_error_budget_remaining:rate{config.window}", expr, name)
    lines += ["  - name: gptoss-slo", "    rules:"]
    for tier in slo.TIERS:
        factor = number(tier.factor)
        lines += [
            f"      - alert: {tier.alert}",
            f"        expr: gptoss:slo_burn_rate:rate{tier.long} > {factor}"
            f" and gptoss:slo_burn_rate:rate{tier.short} > {factor}",
            "        labels:",
            f"          severity: {tier.severity}",
            "        annotations:",
            f'          summary: "{summary(tier, config)}"',
        ]
    return "\n".join(lines) + "\n"


def panel(pid: int, title: str, description: str, y: int, x: int, unit: str, targets: list[dict[str, Any]],
          thresholds: list[float]) -> dict[str, Any]:  # fmt: skip
    """One timeseries panel in the dashboard's style, with dashed threshold lines at `thresholds`."""
    steps = [{"color": "green", "value": None}] + [{"color": "red", "value": t} for t in thresholds]
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"x": x, "y": y, "w": 12, "h": 8},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"lineWidth": 1, "fillOpacity": 10, "thresholdsStyle": {"mode": "dashed"}},
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "min"]},
            "tooltip": {"mode": "multi"},
        },
        "targets": targets,
        "id": pid,
    }


def target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "prometheus"}, "refId": ref, "expr": expr,
            "legendFormat": legend}  # fmt: skip


def panels(y: int, config: SloConfig | None = None) -> list[dict[str, Any]]:
    """The dashboard's error-budget row, starting at height `y`."""
    config = config if config is not None else slo.slo_config()
    cluster = '{cluster=~"$cluster"}'
    remaining = target(
        "A", f"gptoss:slo_error_budget_remaining:rate{config.window}{cluster}", "{{slo}} {{model}}"
    )
    burns = [
        target(chr(ord("A") + i), f"gptoss:slo_burn_rate:rate{w}{cluster}", f"{{{{slo}}}} {{{{model}}}} {w}")
        for i, w in enumerate(slo.WINDOWS)
    ]
    row = {"type": "row", "title": "Error budgets (SLOs)", "collapsed": False,
           "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": [], "id": FIRST_PANEL_ID}  # fmt: skip
    return [
        row,
        panel(FIRST_PANEL_ID + 1, f"Error budget remaining ({config.window_days} days)",
              f"The share of each SLO's {config.window_days}-day error budget not yet spent (shared/sla.toml "
              "[slo]; rules in compose/prometheus/rules/slo.yml). Under 0: overspent.",
              y + 1, 0, "percentunit", [remaining], [0.0]),
        panel(FIRST_PANEL_ID + 2, "Error budget burn rate",
              "How many times faster than the budget allows each SLO fails, per window: 1 spends the "
              "budget exactly over the SLO window. GptossErrorBudgetFastBurn pages at 14.4 (1h and 5m), "
              "GptossErrorBudgetBurn at 6 (6h and 30m), GptossErrorBudgetSlowBurn opens a ticket at 1 "
              "(3d and 6h).",
              y + 1, 12, "short", burns, [tier.factor for tier in reversed(slo.TIERS)]),
    ]  # fmt: skip


def render_dashboard(text: str, config: SloConfig | None = None) -> str:
    """The dashboard JSON `text` with its generated panels rendered again (the others kept as they are)."""
    dashboard = json.loads(text)
    kept = [p for p in dashboard["panels"] if p["id"] < FIRST_PANEL_ID]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in kept)
    dashboard["panels"] = kept + panels(bottom, config)
    return json.dumps(dashboard, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print slo.yml, its windows divided by --scale (a test's Prometheus sees an hour in a minute)."""
    parser = argparse.ArgumentParser(prog="slo_rules", description=main.__doc__)
    parser.add_argument("--scale", type=int, default=1, help="divide every window by this (default 1)")
    args = parser.parse_args(argv)
    sys.stdout.write(render_rules(scale=args.scale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
