"""The SLA alerts and their promtool tests, rendered from the one source of targets (`shared/sla.py`).

Per model, a TTFT and an end-to-end alert (`shared/models.toml`); service-wide, the job error ratio
and API availability alerts (`shared/sla.toml`, lines from `shared/service_rules.py`).
`compose/prometheus/rules/sla.yml` and `compose/prometheus/tests/sla_test.yml` are this module's
output, committed; `scripts/render-rules` writes them again (`--check` says whether they are
current, which tests/test_prometheus.py asserts). One test has every model just under its
threshold; then each model's test puts its p95 just over (the alert fires once `for:` has passed,
not a minute earlier). A model without an SLA, far over every threshold, is in all of them and
never alerts. Thresholds are histogram bucket edges (`shared/sla.py`), so the p95 of
observations all within the threshold can never read over it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.utils import floatToGoString

from shared import service_rules, sla, slo, slo_rules, slo_tests
from shared.sla import ServiceTargets, SlaTarget

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = Path("compose/prometheus/rules/sla.yml")
TESTS_FILE = Path("compose/prometheus/tests/sla_test.yml")

UNLISTED_MODEL = "model-without-sla"
"""A model outside the registry (a hub model served by path): it has no SLA and never alerts."""

WORKER = 'instance="worker-single:9102",job="gptoss-worker"'
"""The target labels of the test series: a worker's, as Prometheus scrapes it."""

SHARE_FAST = 89
"""Of every 100 observations in a test, how many are fast (in the first bucket): the p95 then lies
6/11 into the bucket of the other 11 (off any whole second, so the summary's rounding is certain),
and a wrong quantile (p47.5, p190) reads differently."""


@dataclass(frozen=True)
class SlaAlert:
    """One kind of SLA alert: the recorded p95 it compares, per model, with that model's target."""

    kind: sla.Kind
    alert: str
    recorded: str
    histogram: str
    hold_minutes: int
    what: str
    buckets: Callable[[dict[str, SlaTarget]], tuple[float, ...]]

    def threshold(self, target: SlaTarget) -> float:
        return target.ttft_s if self.kind == "ttft" else target.e2e_s


ALERTS = (
    SlaAlert("ttft", "GptossTTFTOverSLA", "gptoss:ttft_seconds_by_model:p95_5m",
             "gptoss_time_to_first_token_seconds_bucket", 5, "TTFT p95", sla.ttft_buckets),
    SlaAlert("e2e", "GptossE2EOverSLA", "gptoss:e2e_seconds_by_model:p95_5m",
             "gptoss_e2e_request_latency_seconds_bucket", 10, "End-to-end p95", sla.e2e_buckets),
)  # fmt: skip
"""TTFT holds 5 minutes before it fires; end-to-end latency, whose requests last longer, 10."""


def number(value: float) -> str:
    """A threshold as PromQL and the labels write it: 2.0 -> "2", 0.5 -> "0.5"."""
    return f"{value:g}"


def humanize_duration(seconds: float) -> str:
    """Prometheus's `humanizeDuration` template function (what the alert summaries show)."""
    if seconds == 0:
        return "0s"
    sign, value = ("-", -seconds) if seconds < 0 else ("", seconds)
    if value >= 1:
        whole = int(value)
        secs, mins, hours, days = whole % 60, whole // 60 % 60, whole // 3600 % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {mins}m {secs}s"
        if hours:
            return f"{sign}{hours}h {mins}m {secs}s"
        if mins:
            return f"{sign}{mins}m {secs}s"
        return f"{sign}{value:.4g}s"
    prefix = ""
    for unit in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if value >= 1:
            break
        prefix, value = unit, value * 1000
    return f"{sign}{value:.4g}{prefix}s"


GENERATED = (
    "# Generated from shared/models.toml and shared/sla.toml by scripts/render-rules"
    " (shared/sla_rules.py): do not edit."
)


def render_rules(targets: dict[str, SlaTarget] | None = None, service: ServiceTargets | None = None) -> str:
    """compose/prometheus/rules/sla.yml: an alert per model and kind of target, then the service's."""
    targets = targets if targets is not None else sla.sla_targets()
    service = service if service is not None else sla.service_targets()
    lines = [
        GENERATED,
        "# A model's p95 over its SLA (the recorded p95 of the last 5 minutes, rules/recording.yml).",
        "# Every threshold is a bucket edge of its histogram (shared/sla.py), so a p95 of observations",
        "# all within the SLA never reads over it. Then the error budget of the jobs (per model) and",
        "# the API's availability objective (rules/recording.yml records both ratios).",
        "groups:",
        "  - name: gptoss-sla",
        "    rules:",
    ]
    for alert in ALERTS:
        for name, target in sorted(targets.items()):
            limit = number(alert.threshold(target))
            lines += [
                f"      - alert: {alert.alert}",
                f'        expr: {alert.recorded}{{model="{name}"}} > {limit}',
                f"        for: {alert.hold_minutes}m",
                "        labels:",
                "          severity: warning",
                f"          model: {name}",
                f"          slo: {alert.kind}",
                f'          sla_seconds: "{limit}"',
                "        annotations:",
                f'          summary: "{alert.what} of {{{{ $labels.model }}}} is'
                f' {{{{ $value | humanizeDuration }}}} (SLA {limit} s)"',
            ]
    lines += service_rules.render_rules(service)
    return "\n".join(lines) + "\n"


def neighbours(buckets: tuple[float, ...], threshold: float) -> tuple[float, float]:
    """The bucket edges just under and just over `threshold`, which must itself be an edge."""
    if threshold not in buckets:
        raise ValueError(f"SLA threshold {threshold} is not a bucket edge of {buckets}")
    index = buckets.index(threshold)
    if index in (0, len(buckets) - 1):
        raise ValueError(f"SLA threshold {threshold} needs a bucket edge on each side in {buckets}")
    return buckets[index - 1], buckets[index + 1]


def per_minute(buckets: tuple[float, ...], threshold: float | None, over: bool) -> dict[str, int]:
    """Cumulative observations per minute by `le` for a model whose slow tenth lies just over
    (`over`) or just under `threshold`; None: a model without an SLA, everything past the last edge."""
    if threshold is None:
        return {floatToGoString(buckets[-1]): 0, "+Inf": 100}
    under, above = neighbours(buckets, threshold)
    return {
        floatToGoString(buckets[0]): SHARE_FAST,
        floatToGoString(under): SHARE_FAST,
        floatToGoString(threshold): SHARE_FAST if over else 100,
        floatToGoString(above): 100,
        "+Inf": 100,
    }


def input_series(alert: SlaAlert, targets: dict[str, SlaTarget], over: str | None, samples: int) -> list[str]:
    """One test's input: model `over` just over its threshold (None: every model just under its
    own), and the model without an SLA."""
    buckets = alert.buckets(targets)
    models: list[tuple[str, float | None]] = [
        (n, alert.threshold(t)) for n, t in sorted(targets.items()) if over in (None, n)
    ]
    lines = []
    for model, threshold in [*models, (UNLISTED_MODEL, None)]:
        for le, rate in per_minute(buckets, threshold, model == over).items():
            labels = f'model="{model}",queue="gpu-single",le="{le}",{WORKER}'
            lines.append(f"      - {{series: '{alert.histogram}{{{labels}}}', values: '0+{rate}x{samples}'}}")
    return lines


def render_tests(targets: dict[str, SlaTarget] | None = None, service: ServiceTargets | None = None) -> str:
    """compose/prometheus/tests/sla_test.yml: each SLA alert pinned from both sides, and its `for:`."""
    targets = targets if targets is not None else sla.sla_targets()
    service = service if service is not None else sla.service_targets()
    lines = [
        GENERATED,
        "# promtool test rules: each model's SLA alert fires when its p95 is just over the threshold,",
        "# once `for:` has passed (the p95 exists from the first rate, at 1m), and is silent just under;",
        "# so do the error ratio and availability alerts, just over and just under their targets.",
        "rule_files:",
        "  - ../rules/recording.yml",
        "  - ../rules/sla.yml",
        "",
        "evaluation_interval: 1m",
        "# The p95 is recorded before the alerts read it (promtool's own order would be random).",
        "group_eval_order: [gptoss-recording, gptoss-sla]",
        "",
        "tests:",
    ]
    for alert in ALERTS:
        hold = alert.hold_minutes
        samples = 2 * hold + 2
        lines += [
            f'  - name: "{alert.alert}: every model just under its SLA is silent"',
            "    interval: 1m",
            "    input_series:",
            *input_series(alert, targets, None, samples),
            "    alert_rule_test:",
            f"      - {{eval_time: {hold + 1}m, alertname: {alert.alert}, exp_alerts: []}}",
            f"      - {{eval_time: {2 * hold + 1}m, alertname: {alert.alert}, exp_alerts: []}}",
        ]
        for name, target in sorted(targets.items()):
            threshold = alert.threshold(target)
            _, above = neighbours(alert.buckets(targets), threshold)
            p95 = threshold + (above - threshold) * (95 - SHARE_FAST) / (100 - SHARE_FAST)
            limit = number(threshold)
            lines += [
                f'  - name: "{alert.alert}: {name} just over {limit} s fires after {hold}m"',
                "    interval: 1m",
                "    input_series:",
                *input_series(alert, targets, name, samples),
                "    alert_rule_test:",
                f"      - {{eval_time: {hold}m, alertname: {alert.alert}, exp_alerts: []}}",
                f"      - eval_time: {hold + 1}m",
                f"        alertname: {alert.alert}",
                "        exp_alerts:",
                f'          - exp_labels: {{severity: warning, slo: {alert.kind}, sla_seconds: "{limit}", '
                f"model: {name}}}",
                "            exp_annotations:",
                f'              summary: "{alert.what} of {name} is {humanize_duration(p95)}'
                f' (SLA {limit} s)"',
            ]
    lines += service_rules.render_tests(service)
    return "\n".join(lines) + "\n"


def rendered() -> dict[Path, str]:
    """Every generated file (relative to the repository) and its content."""
    targets, service = sla.sla_targets(), sla.service_targets()
    files = {RULES_FILE: render_rules(targets, service), TESTS_FILE: render_tests(targets, service)}
    # The error budgets (issue #25): their rules, promtool tests and dashboard panels.
    config = slo.slo_config()
    objectives = slo.slos(targets, service, config)
    files[slo_rules.RULES_FILE] = slo_rules.render_rules(objectives, config)
    files |= {slo_tests.test_file(t): slo_tests.render_tests(t, objectives, config) for t in slo.TIERS}
    dashboard = (ROOT / slo_rules.DASHBOARD_FILE).read_text()
    files[slo_rules.DASHBOARD_FILE] = slo_rules.render_dashboard(dashboard, config)
    return files


def main(argv: list[str] | None = None) -> int:
    """Write the generated files under the repository (or, with --check, say which are stale)."""
    parser = argparse.ArgumentParser(prog="render-rules", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    stale = []
    for relative, text in rendered().items():
        path = args.root / relative
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(relative))
        if not args.check:
            path.write_text(text)
    verb = "stale" if args.check else "written"
    print(f"render-rules: {', '.join(stale) or 'nothing'} {verb}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
