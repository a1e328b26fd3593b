"""promtool tests of the error-budget rules (`shared/slo_rules.py`), one file per alert tier.

Every objective burns at the same multiple of the tier's factor at once, so each case checks every
rule. Per tier, four cases pin both windows from both sides: a steady burn just over the factor
fires; just under it is silent; a burn that has eased off (the long window still over, the short one
under) is silent; a short spike (the short window over, the long one under) is silent. Beside the
events that count run events that must not (the scheduler's rejections, probes answering 503, other
models' observations), sized so that a wrong matcher changes the outcome
(tests/test_alert_mutations.py). The slowest tier's file also pins the budget left. Each file steps
at a sixth of its short window, so a tier is 72 + 12 steps whatever its windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from prometheus_client.utils import floatToGoString

from shared import slo
from shared.slo import Slo, SloConfig, Tier
from shared.slo_rules import GENERATED, number, summary

TTFT_BUCKET, TTFT_COUNT = (
    "gptoss_time_to_first_token_seconds_bucket",
    "gptoss_time_to_first_token_seconds_count",
)

PER_STEP = 1000
"""Events per step of a test, per model (and for the API)."""

OVER, UNDER, HALF = 1.25, 0.75, 0.5
"""Burn rates of the cases, as multiples of the tier's factor."""

PROBES_FAILING = 0.6
"""Probes answering 503 per step, as a multiple of the API's failures at the factor: not counted."""

REJECTED = 3
"""The scheduler's rejections per model, as multiples of the jobs that ran: not counted."""

UNLISTED_MODEL = "model-without-sla"
"""A model outside the registry (a hub model served by path): it has no SLO and never alerts."""

WORKER = 'instance="worker-single:9102",job="gptoss-worker"'
SCHEDULER = 'instance="scheduler:9101",job="gptoss-scheduler"'
API = 'instance="api:8000",job="gptoss-api"'
JOB_ROUTE = 'method="GET",route="/v1/jobs/<job_id>"'
PROBE_ROUTE = 'method="GET",route="/readyz"'


@dataclass(frozen=True)
class Case:
    """One test: the burn (multiples of the factor) per stretch of steps, and whether it alerts."""

    name: str
    stretches: tuple[tuple[int, float], ...]
    fires: bool

    @property
    def steps(self) -> int:
        return sum(steps for steps, _ in self.stretches)


def test_file(tier: Tier) -> Path:
    """Where `tier`'s tests are written."""
    return Path(f"compose/prometheus/tests/slo_{tier.long}_test.yml")


def step_seconds(tier: Tier) -> int:
    return slo.window_seconds(tier.short) // 6


def cases(tier: Tier) -> list[Case]:
    """The four cases of a tier (its long window 72 steps, its short one 6)."""
    long, short = 72, 6
    return [
        Case(f"burning {OVER}x the factor in both windows fires", ((long, OVER),), True),
        Case(f"burning {UNDER}x the factor is silent", ((long, UNDER),), False),
        Case(f"eased off to {UNDER}x over twice the short window (long still over): silent",
             ((long, OVER), (2 * short, UNDER)), False),
        Case(f"a spike of {OVER}x over twice the short window (long still under): silent",
             ((long, UNDER), (2 * short, OVER)), False),
    ]  # fmt: skip


def counter(per_step: list[tuple[int, float]]) -> str:
    """promtool's expanding notation for a counter from 0 growing by each (steps, increase) in turn."""
    parts, value = [], 0.0
    for n, (steps, increase) in enumerate(per_step):
        start = value if n == 0 else value + increase
        count = steps if n == 0 else steps - 1
        parts.append(f"{number(start)}+{number(increase)}x{count}")
        value = start + increase * count
    return " ".join(parts)


def bad(objective: Slo, factor: float, multiple: float) -> float:
    """Bad events per step of `objective` burning at `multiple` times `factor`."""
    count = PER_STEP * objective.budget * factor * multiple
    if count > PER_STEP:
        raise ValueError(
            f"{objective.name}: a {factor * multiple}x burn needs more bad events than there are"
        )
    return count


def series(name: str, labels: str, case: Case, per_step: Callable[[float], float]) -> str:
    """One input series: `per_step(multiple)` is its increase per step while burning at `multiple`."""
    grow = [(steps, per_step(multiple)) for steps, multiple in case.stretches]
    return f"      - {{series: '{name}{{{labels}}}', values: '{counter(grow)}'}}"


def steady(value: float) -> Callable[[float], float]:
    """An increase per step that does not depend on the burn."""
    return lambda multiple: value


def ttft_inputs(objectives: list[Slo], factor: float, case: Case) -> list[str]:
    """Per model, first tokens by bucket edge: good ones fast, bad ones just over the threshold; and
    a model without an SLO whose first tokens are all slow."""
    ttft = [o for o in objectives if o.name == "ttft" and o.threshold_s is not None]
    edges = [*sorted({o.threshold_s for o in ttft if o.threshold_s is not None}), float("inf")]
    lines = []
    for o in ttft:
        assert o.threshold_s is not None
        labels = f'model="{o.model}",queue="gpu-single",{WORKER}'
        for le in edges:
            good = le <= o.threshold_s
            per_step = partial(
                lambda m, o, good: PER_STEP - bad(o, factor, m) if good else PER_STEP, o=o, good=good
            )
            lines.append(series(TTFT_BUCKET, f'le="{floatToGoString(le)}",{labels}', case, per_step))
        lines.append(series(TTFT_COUNT, labels, case, steady(PER_STEP)))
    labels = f'model="{UNLISTED_MODEL}",queue="gpu-single",{WORKER}'
    for le in edges:
        slow = partial(lambda m, le: PER_STEP if le == float("inf") else 0, le=le)
        lines.append(series(TTFT_BUCKET, f'le="{floatToGoString(le)}",{labels}', case, slow))
    return [*lines, series(TTFT_COUNT, labels, case, steady(PER_STEP))]


def inputs(objectives: list[Slo], factor: float, case: Case) -> list[str]:
    """Every objective's events, burning as `case` says, and the events that must not count."""
    lines = ttft_inputs(objectives, factor, case)
    for o in objectives:
        failing = partial(lambda m, o: bad(o, factor, m), o=o)
        passing = partial(lambda m, o: PER_STEP - bad(o, factor, m), o=o)
        if o.name == "errors":
            model, jobs = f'model="{o.model}"', "gptoss_jobs_total"
            lines += [
                series(jobs, f'{model},status="finished",{WORKER}', case, passing),
                series(jobs, f'{model},status="failed",{WORKER}', case, failing),
                series(jobs, f'{model},status="rejected",{SCHEDULER}', case, steady(REJECTED * PER_STEP)),
            ]
        elif o.name == "availability":
            probes_failing = PROBES_FAILING * bad(o, factor, 1)
            answers = "gptoss_http_requests_total"
            lines += [
                series(answers, f'{JOB_ROUTE},status="200",{API}', case, passing),
                series(answers, f'{JOB_ROUTE},status="500",{API}', case, failing),
                series(
                    answers, f'{PROBE_ROUTE},status="200",{API}', case, steady(PER_STEP / 2 - probes_failing)
                ),
                series(answers, f'{PROBE_ROUTE},status="503",{API}', case, steady(probes_failing)),
            ]
    return lines


def expected(objectives: list[Slo], tier: Tier, config: SloConfig) -> list[str]:
    """The alerts `tier` raises when every objective burns over its factor: one per series."""
    lines = []
    for o in slo_series(objectives):
        model = f", model: {o.model}" if o.model else ""
        text = summary(tier, config).replace("{{ $labels.slo }}", o.name)
        text = text.replace(
            "{{ with $labels.model }} of {{ . }}{{ end }}", f" of {o.model}" if o.model else ""
        )
        lines += [
            f"          - exp_labels: {{severity: {tier.severity}, slo: {o.name}{model}}}",
            f'            exp_annotations: {{summary: "{text}"}}',
        ]
    return lines


def slo_series(objectives: list[Slo]) -> list[Slo]:
    """The objectives in the order of their series' labels (availability has no model)."""
    return sorted(objectives, key=lambda o: (o.name, o.model or ""))


def budget_test(objectives: list[Slo], config: SloConfig, step: int) -> list[str]:
    """Half the budget spent at a steady burn: every objective has half of it left."""
    case = Case("budget", ((72, HALF),), False)
    return [
        f'  - name: "half the budget spent over {72 * step // 3600}h:'
        f' half of each {config.window} budget left"',
        f"    interval: {step}s",
        "    input_series:",
        *inputs(objectives, 1, case),
        "    promql_expr_test:",
        *values(f"gptoss:slo_error_budget_remaining:rate{config.window}", objectives, 72 * step, HALF),
    ]


def values(recorded: str, objectives: list[Slo], at: int, value: float) -> list[str]:
    """A promql_expr_test: every objective's `recorded` series is `value` (to a thousandth) at `at`
    seconds, and no other series is there."""
    lines = [f"      - expr: round({recorded}, 0.001)", f"        eval_time: {at}s", "        exp_samples:"]
    for o in slo_series(objectives):
        labels = f'model="{o.model}",slo="{o.name}"' if o.model else f'slo="{o.name}"'
        lines.append(f"          - {{labels: '{{{labels}}}', value: {number(value)}}}")
    return lines


def render_tests(tier: Tier, objectives: list[Slo] | None = None, config: SloConfig | None = None) -> str:
    """One tier's promtool test file."""
    config = config if config is not None else slo.slo_config()
    objectives = objectives if objectives is not None else slo.slos(config=config)
    step = step_seconds(tier)
    lines = [
        GENERATED.replace("slo_rules.py", "slo_tests.py"),
        f"# {tier.alert} ({number(tier.factor)}x over {tier.long} and {tier.short}) from both sides of each",
        "# window: every objective burns at once, so each case checks every rule (shared/slo_tests.py).",
        "rule_files:",
        "  - ../rules/slo.yml",
        "",
        f"evaluation_interval: {12 * step}s",
        "group_eval_order: [gptoss-slo-recording, gptoss-slo]",
        "",
        "tests:",
    ]
    for case in cases(tier):
        lines += [
            f'  - name: "{tier.alert}: {case.name}"',
            f"    interval: {step}s",
            "    input_series:",
            *inputs(objectives, tier.factor, case),
            "    alert_rule_test:",
            f"      - eval_time: {case.steps * step}s",
            f"        alertname: {tier.alert}",
        ]
        if case.fires:
            lines += ["        exp_alerts:", *expected(objectives, tier, config), "    promql_expr_test:"]
            for window in (tier.long, tier.short):  # every series of both windows, pinned
                lines += values(
                    f"gptoss:slo_burn_rate:rate{window}", objectives, case.steps * step, OVER * tier.factor
                )
        else:
            lines.append("        exp_alerts: []")
    if tier is slo.TIERS[-1]:
        lines += budget_test(objectives, config, step)
    return "\n".join(lines) + "\n"
