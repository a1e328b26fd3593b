"""Error budgets (issue #25): the SLOs come from the one source of targets, the generated rules,
promtool tests and dashboard panels are current and mirrored into Kubernetes, every generated alert
fires at its burn rate and not below it (promtool), and other objectives render rules their own
tests pin."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared import sla, sla_rules, slo, slo_rules, slo_tests
from shared.slo import SloConfig

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "compose" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool must be on PATH (Debian's prometheus package; scripts/setup installs it)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load((ROOT / slo_rules.RULES_FILE).read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_generated_files_are_current() -> None:
    for relative, text in sla_rules.rendered().items():
        assert (ROOT / relative).read_text() == text, f"{relative} is stale: run scripts/render-rules"
    done = subprocess.run([ROOT / "scripts" / "render-rules", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_kubernetes_mounts_every_rule_file() -> None:
    """k8s runs the compose rules (kustomize's configMapGenerator): slo.yml included."""
    kustomization = yaml.safe_load((ROOT / "compose" / "kustomization.yaml").read_text())
    (rules,) = [g["files"] for g in kustomization["configMapGenerator"] if g["name"] == "prometheus-rules"]
    assert set(rules) == {f"prometheus/rules/{f.name}" for f in (PROMETHEUS / "rules").glob("*.yml")}


def test_objectives_come_from_the_one_source() -> None:
    objectives = slo.slos()
    targets, service, config = sla.sla_targets(), sla.service_targets(), slo.slo_config()
    assert {o.model for o in objectives if o.name == "ttft"} == set(targets)
    for o in objectives:
        if o.name == "ttft":
            assert o.threshold_s == targets[o.model or ""].ttft_s and o.objective == config.ttft_objective
        elif o.name == "errors":
            assert o.budget == pytest.approx(service.error_budget)
        else:
            assert o.model is None and o.objective == service.availability
    assert config.window == "28d"


def test_every_ttft_threshold_is_a_bucket_edge_of_the_histogram() -> None:
    """The good first tokens are read from the bucket at the threshold: it must exist."""
    from prometheus_client.utils import floatToGoString

    assert "buckets=sla.ttft_buckets()" in (ROOT / "shared" / "metrics.py").read_text()  # what workers export
    edges = set(sla.ttft_buckets())
    text = (ROOT / slo_rules.RULES_FILE).read_text()
    for o in slo.slos():
        if o.name == "ttft":
            assert o.threshold_s in edges
            assert f'le="{floatToGoString(o.threshold_s)}", model=~"' in text


def test_the_alerts_are_the_workbooks_tiers() -> None:
    found = alerts()
    expected = {
        "GptossErrorBudgetFastBurn": ("1h", "5m", "14.4", "critical"),
        "GptossErrorBudgetBurn": ("6h", "30m", "6", "critical"),
        "GptossErrorBudgetSlowBurn": ("3d", "6h", "1", "warning"),
    }
    assert set(found) == set(expected)
    for name, (long, short, factor, severity) in expected.items():
        assert found[name]["expr"] == (
            f"gptoss:slo_burn_rate:rate{long} > {factor} and gptoss:slo_burn_rate:rate{short} > {factor}"
        )
        assert found[name]["labels"]["severity"] == severity


@pytest.mark.parametrize("tier", slo.TIERS, ids=lambda t: t.alert)
def test_each_tier_fires_at_its_burn_rate_and_not_below(tier: slo.Tier) -> None:
    tests = yaml.safe_load((ROOT / slo_tests.test_file(tier)).read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", []) if c["alertname"] == tier.alert]
    assert (
        len([c for c in cases if c["exp_alerts"]]) == 1
        and len([c for c in cases if not c["exp_alerts"]]) == 3
    )
    (fired,) = [c["exp_alerts"] for c in cases if c["exp_alerts"]]
    assert len(fired) == len(slo.slos())  # one per objective's series
    done = promtool("test", "rules", str(slo_tests.test_file(tier)))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_other_objectives_render_rules_their_tests_pin(tmp_path: Path) -> None:
    """The generated tests follow the targets: a 97% TTFT objective over 7 days, other budgets."""
    service = sla.ServiceTargets(error_budget=0.01, error_for_minutes=5, availability=0.995,
                                 availability_for_minutes=5)  # fmt: skip
    config = SloConfig(window_days=7, ttft_objective=0.97)
    objectives = slo.slos(service=service, config=config)
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / "slo.yml").write_text(slo_rules.render_rules(objectives, config))
    assert "/ 0.03\n" in (tmp_path / "rules" / "slo.yml").read_text()
    assert "gptoss:slo_error_budget_remaining:rate7d" in (tmp_path / "rules" / "slo.yml").read_text()
    files = []
    for tier in slo.TIERS:
        files.append(tmp_path / "tests" / slo_tests.test_file(tier).name)
        files[-1].write_text(slo_tests.render_tests(tier, objectives, config))
    done = promtool("test", "rules", *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr


def test_scaled_windows_divide_every_window() -> None:
    text = slo_rules.render_rules(scale=60)
    assert "[60s]" in text and "[5s]" in text and "[40320s]" in text and "[1h]" not in text
    assert text.replace("[60s]", "[1h]").replace("[5s]", "[5m]") != slo_rules.render_rules()
    with pytest.raises(ValueError, match="whole number of seconds"):
        slo_rules.render_rules(scale=7)


@pytest.mark.parametrize(
    "text",
    [
        "[slo]\nttft_objective = 0.95\n",
        "[slo]\nwindow_days = 28\nttft_objective = 95\n",
        "[slo]\nwindow_days = 0\nttft_objective = 0.95\n",
        "[slo]\nwindow_days = 28.5\nttft_objective = 0.95\n",
        "[slo]\nwindow_days = 28\nttft_objective = 0.9\n",  # 14.4x a 10% budget: more than every event
    ],
)
def test_slo_config_refuses_what_no_rule_can_use(text: str) -> None:
    with pytest.raises(ValueError, match=r"sla.toml: \[slo\]"):
        slo.slo_config(text)


def test_the_dashboard_draws_budget_and_burn() -> None:
    dashboard = json.loads((ROOT / slo_rules.DASHBOARD_FILE).read_text())
    generated = [p for p in dashboard["panels"] if p["id"] >= slo_rules.FIRST_PANEL_ID]
    exprs = " ".join(t["expr"] for p in generated for t in p.get("targets", []))
    assert "gptoss:slo_error_budget_remaining:rate28d" in exprs
    assert all(f"gptoss:slo_burn_rate:rate{w}" in exprs for w in slo.WINDOWS)
    hand = [p for p in dashboard["panels"] if p["id"] < slo_rules.FIRST_PANEL_ID]
    assert min(p["gridPos"]["y"] for p in generated) == max(
        p["gridPos"]["y"] + p["gridPos"]["h"] for p in hand
    )
    # Rendering again keeps the hand-written panels as they are.
    again = json.loads(slo_rules.render_dashboard(json.dumps(dashboard)))
    assert again == dashboard
