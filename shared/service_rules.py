"""The service-wide alerts (job error ratio, API availability) and their promtool tests, rendered from
`shared/sla.toml` (`shared/sla.service_targets()`).

`shared/sla_rules.py` puts these lines into the generated `rules/sla.yml` and `tests/sla_test.yml`.
Each alert's tests put its ratio at 1.5 times the allowed share of failures (fires once `for:` has
passed, not a minute earlier) and at 0.75 times it (silent), beside traffic that must not count
(the scheduler's rejections, probes answering 503), sized so that a wrong matcher changes the
outcome. Counts are per minute, out of `PER_MINUTE` that ran (or were answered).
"""

from __future__ import annotations

from shared.sla import ServiceTargets

PER_MINUTE = 2000
"""Jobs that ran (or answers the API gave) per minute in a test."""

OVER, UNDER = 1.5, 0.75
"""The share of failures in a firing and a silent test, as multiples of the allowed share."""

WORKER = 'instance="worker-single:9102",job="gptoss-worker"'
SCHEDULER = 'instance="scheduler:9101",job="gptoss-scheduler"'
API = 'instance="api:8000",job="gptoss-api"'
JOB_ROUTE = 'method="GET",route="/v1/jobs/<job_id>"'
PROBE_ROUTE = 'method="GET",route="/readyz"'


def number(value: float) -> str:
    """A count or threshold as PromQL and promtool write it: 2.0 -> "2", 0.5 -> "0.5"."""
    return f"{value:g}"


def percent(share: float) -> str:
    """A share as the rule summaries name a target: 0.001 -> "0.1%"."""
    return f"{share * 100:g}%"


def humanize_percentage(share: float) -> str:
    """Prometheus's `humanizePercentage` template function (Go's `%.4g` of the share times 100)."""
    return f"{share * 100:.4g}%"


def render_rules(targets: ServiceTargets) -> list[str]:
    """The two alerts, as rule lines of the generated group."""
    return [
        "      - alert: GptossErrorRatioHigh",
        f"        expr: gptoss:error_ratio:rate5m > {number(targets.error_budget)}",
        f"        for: {targets.error_for_minutes}m",
        "        labels:",
        "          severity: critical",
        "        annotations:",
        '          summary: "{{ $value | humanizePercentage }} of {{ $labels.model }} jobs fail'
        f' (budget {percent(targets.error_budget)})"',
        "      - alert: GptossAvailabilityLow",
        f"        expr: gptoss:availability:ratio_rate5m < {number(targets.availability)}",
        f"        for: {targets.availability_for_minutes}m",
        "        labels:",
        "          severity: critical",
        "        annotations:",
        '          summary: "API availability is {{ $value | humanizePercentage }}'
        f' (objective {percent(targets.availability)})"',
    ]


def series(name: str, labels: str, per_minute: float, samples: int) -> str:
    """One input series of a promtool test: a counter growing by `per_minute` from 0."""
    return f"      - {{series: '{name}{{{labels}}}', values: '0+{number(per_minute)}x{samples}'}}"


def error_tests(targets: ServiceTargets) -> list[str]:
    """GptossErrorRatioHigh just over the budget (fires after `for:`) and just under it (silent)."""
    hold, budget = targets.error_for_minutes, targets.error_budget
    jobs = "gptoss_jobs_total"
    model = 'model="gpt-oss-20b"'
    over = float(number(OVER * budget * PER_MINUTE))
    under = float(number(UNDER * budget * PER_MINUTE))
    return [
        f'  - name: "GptossErrorRatioHigh: {humanize_percentage(over / PER_MINUTE)} of the jobs'
        f' that ran fail, over the {percent(budget)} budget: fires after {hold}m"',
        "    interval: 1m",
        "    input_series:",
        "      # The scheduler's rejections are the client's, not errors: as many again, not counted.",
        series(jobs, f'{model},status="finished",{WORKER}', PER_MINUTE - over, 2 * hold),
        series(jobs, f'{model},status="failed",{WORKER}', over, 2 * hold),
        series(jobs, f'{model},status="rejected",{SCHEDULER}', PER_MINUTE, 2 * hold),
        "    alert_rule_test:",
        f"      - {{eval_time: {hold}m, alertname: GptossErrorRatioHigh, exp_alerts: []}}",
        f"      - eval_time: {hold + 1}m",
        "        alertname: GptossErrorRatioHigh",
        "        exp_alerts:",
        "          - exp_labels: {severity: critical, model: gpt-oss-20b}",
        "            exp_annotations:",
        f'              summary: "{humanize_percentage(over / PER_MINUTE)} of gpt-oss-20b jobs fail'
        f' (budget {percent(budget)})"',
        f'  - name: "GptossErrorRatioHigh: {humanize_percentage(under / PER_MINUTE)} of the jobs'
        f' that ran fail, under the {percent(budget)} budget: silent"',
        "    interval: 1m",
        "    input_series:",
        series(jobs, f'{model},status="finished",{WORKER}', PER_MINUTE - under, 4 * hold),
        series(jobs, f'{model},status="failed",{WORKER}', under, 4 * hold),
        series(jobs, f'{model},status="rejected",{SCHEDULER}', PER_MINUTE / 20, 4 * hold),
        "    alert_rule_test:",
        f"      - {{eval_time: {hold + 1}m, alertname: GptossErrorRatioHigh, exp_alerts: []}}",
        f"      - {{eval_time: {4 * hold}m, alertname: GptossErrorRatioHigh, exp_alerts: []}}",
    ]


def availability_tests(targets: ServiceTargets) -> list[str]:
    """GptossAvailabilityLow just under the objective (fires after `for:`) and just over it (silent)."""
    hold, allowed = targets.availability_for_minutes, 1 - targets.availability
    answers = "gptoss_http_requests_total"
    over = float(number(OVER * allowed * PER_MINUTE))
    under = float(number(UNDER * allowed * PER_MINUTE))
    objective = percent(targets.availability)
    low, high = humanize_percentage(1 - over / PER_MINUTE), humanize_percentage(1 - under / PER_MINUTE)
    return [
        f'  - name: "GptossAvailabilityLow: {low}, under the {objective} objective: fires after {hold}m"',
        "    interval: 1m",
        "    input_series:",
        "      # Probes answering 200 are as many again and do not count.",
        series(answers, f'{JOB_ROUTE},status="200",{API}', PER_MINUTE - over, 2 * hold),
        series(answers, f'{JOB_ROUTE},status="500",{API}', over, 2 * hold),
        series(answers, f'{PROBE_ROUTE},status="200",{API}', PER_MINUTE, 2 * hold),
        "    alert_rule_test:",
        f"      - {{eval_time: {hold}m, alertname: GptossAvailabilityLow, exp_alerts: []}}",
        f"      - eval_time: {hold + 1}m",
        "        alertname: GptossAvailabilityLow",
        "        exp_alerts:",
        "          - exp_labels: {severity: critical}",
        "            exp_annotations:",
        f'              summary: "API availability is {low} (objective {objective})"',
        f'  - name: "GptossAvailabilityLow: {high}, over the {objective} objective, failing probes'
        ' left out: silent"',
        "    interval: 1m",
        "    input_series:",
        "      # /readyz answering 503 while the stack starts is not the API failing a client.",
        series(answers, f'{JOB_ROUTE},status="200",{API}', PER_MINUTE - under, 4 * hold),
        series(answers, f'{JOB_ROUTE},status="500",{API}', under, 4 * hold),
        series(answers, f'{PROBE_ROUTE},status="200",{API}', PER_MINUTE / 20, 4 * hold),
        series(answers, f'{PROBE_ROUTE},status="503",{API}', 2 * allowed * PER_MINUTE, 4 * hold),
        "    alert_rule_test:",
        f"      - {{eval_time: {hold + 1}m, alertname: GptossAvailabilityLow, exp_alerts: []}}",
        f"      - {{eval_time: {4 * hold}m, alertname: GptossAvailabilityLow, exp_alerts: []}}",
    ]


def render_tests(targets: ServiceTargets) -> list[str]:
    """The two alerts' promtool test cases, as lines of the generated `tests:` list."""
    return [*error_tests(targets), *availability_tests(targets)]
