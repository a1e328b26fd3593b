"""Prometheus, Alertmanager and Grafana files: promtool and amtool accept them, every alert is pinned
by a unit test fed only series the processes export, the SLA alerts are rendered from the one
source, every recording rule is read, and the dashboard reads what the rules and the autoscaler do."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import sla, sla_rules
from tests import exported_series
from tests.conftest import DASHBOARD, RULES, dashboard_exprs, used_metric_names
from tests.monitoring import as_promql

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "compose" / "prometheus"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*_test.yml"))
ALERTMANAGER = ROOT / "compose" / "alertmanager" / "alertmanager.yml"
DATASOURCES = ROOT / "compose" / "grafana" / "provisioning" / "datasources" / "gptoss.yml"
AUTOSCALING = ROOT / "compose" / "k8s" / "autoscaling.yaml"
CONFIGS = ["compose/prometheus/prometheus.yml", "compose/k8s/prometheus.yml"]


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which(name)
    assert binary, f"{name} must be on PATH (Debian's prometheus and prometheus-alertmanager; scripts/setup)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def rules_of(*files: Path) -> list[dict[str, Any]]:
    return [r for f in files for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


@pytest.mark.parametrize("config", [*CONFIGS, "compose/prometheus/central.yml"])
def test_config_checks(config: str) -> None:
    done = tool("promtool", "check", "config", "--syntax-only", config)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_config_with_its_rules_checks() -> None:
    done = tool("promtool", "check", "config", "compose/prometheus/prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(RULES)} rule files found" in done.stdout


def test_rules_check() -> None:
    done = tool("promtool", "check", "rules", *map(str, RULES))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(tests: Path) -> None:
    done = tool("promtool", "test", "rules", str(tests))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name)
def test_rule_tests_feed_only_series_the_processes_export(tests: Path) -> None:
    missing = exported_series.unexported(tests, exported_series.load())
    assert not missing, (
        "fed to promtool but not exported by a healthy stack (exported_series.yml):\n" + "\n".join(missing)
    )


def test_sla_rules_are_rendered_from_the_registry() -> None:
    for relative, text in sla_rules.rendered().items():
        assert (ROOT / relative).read_text() == text, f"{relative} is stale: run scripts/render-rules"
    targets = sla.sla_targets()
    per_model = {a.alert for a in sla_rules.ALERTS}
    alerts = [r for r in rules_of(PROMETHEUS / "rules" / "sla.yml") if r.get("alert") in per_model]
    assert {(r["labels"]["model"], r["labels"]["slo"]) for r in alerts} == {
        (model, kind) for model in targets for kind in ("ttft", "e2e")
    }
    for rule in alerts:
        target = targets[rule["labels"]["model"]]
        limit = target.ttft_s if rule["labels"]["slo"] == "ttft" else target.e2e_s
        assert rule["expr"].endswith(f" > {limit:g}") and rule["labels"]["sla_seconds"] == f"{limit:g}"


def test_error_budget_and_availability_alerts_are_rendered_from_sla_toml() -> None:
    service = sla.service_targets()
    alerts = {r["alert"]: r for r in rules_of(PROMETHEUS / "rules" / "sla.yml")}
    errors, availability = alerts["GptossErrorRatioHigh"], alerts["GptossAvailabilityLow"]
    assert errors["expr"] == f"gptoss:error_ratio:rate5m > {service.error_budget:g}"
    assert errors["for"] == f"{service.error_for_minutes}m"
    assert availability["expr"] == f"gptoss:availability:ratio_rate5m < {service.availability:g}"
    assert availability["for"] == f"{service.availability_for_minutes}m"
    by_hand = {r.get("alert") for r in rules_of(PROMETHEUS / "rules" / "alerts.yml")}
    assert not by_hand & set(alerts), "a generated alert is also written by hand in alerts.yml"


def test_other_service_targets_render_rules_their_tests_pin(tmp_path: Path) -> None:
    """The generated tests follow the targets: other budgets and durations pass their own tests."""
    service = sla.ServiceTargets(error_budget=0.02, error_for_minutes=10, availability=0.995,
                                 availability_for_minutes=3)  # fmt: skip
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(PROMETHEUS / "rules" / "recording.yml", tmp_path / "rules")
    (tmp_path / "rules" / "sla.yml").write_text(sla_rules.render_rules(service=service))
    (tmp_path / "tests" / "sla_test.yml").write_text(sla_rules.render_tests(service=service))
    done = tool("promtool", "test", "rules", str(tmp_path / "tests" / "sla_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "> 0.02" in (tmp_path / "rules" / "sla.yml").read_text()


@pytest.mark.parametrize(
    "text",
    [
        "[job_errors]\nbudget = 0.001\nfor_minutes = 5\n",  # no [availability]
        "[job_errors]\nbudget = 1.5\nfor_minutes = 5\n[availability]\nobjective = 0.999\nfor_minutes = 5\n",
        "[job_errors]\nbudget = 0.001\nfor_minutes = 0\n[availability]\nobjective = 0.999\nfor_minutes = 5\n",
        "[job_errors]\nbudget = 0.001\nfor_minutes = 5\n[availability]\nobjective = 99.9\nfor_minutes = 5\n",
    ],
)
def test_service_targets_refuse_what_no_alert_can_use(text: str) -> None:
    with pytest.raises(ValueError, match="sla.toml"):
        sla.service_targets(text)


def test_ttft_sla_of_the_gpt_oss_models() -> None:
    sla_alerts = {r["labels"]["model"]: r["expr"] for r in rules_of(PROMETHEUS / "rules" / "sla.yml")
                  if r["alert"] == "GptossTTFTOverSLA"}  # fmt: skip
    assert sla_alerts["gpt-oss-20b"] == 'gptoss:ttft_seconds_by_model:p95_5m{model="gpt-oss-20b"} > 2'
    assert sla_alerts["gpt-oss-120b"] == 'gptoss:ttft_seconds_by_model:p95_5m{model="gpt-oss-120b"} > 5'


def test_every_alert_is_silent_when_healthy_and_fires_in_a_test() -> None:
    cases = [c for t in RULE_TESTS for test in yaml.safe_load(t.read_text())["tests"]
             for c in test.get("alert_rule_test", [])]  # fmt: skip
    silent = {c["alertname"] for c in cases if c["exp_alerts"] == []}
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    names = {r["alert"] for r in rules_of(*RULES) if "alert" in r}
    assert names <= silent and names <= fired


def test_every_recording_rule_is_read() -> None:
    """By an alert, the dashboard or the autoscaler: a recorded series nothing reads is removed."""
    readers = " ".join(r["expr"] for r in rules_of(*RULES) if "alert" in r)
    readers += " ".join(dashboard_exprs())
    readers += " ".join(t["metadata"]["query"] for d in yaml.safe_load_all(AUTOSCALING.read_text()) if d
                        for t in d["spec"]["triggers"])  # fmt: skip
    for record in (r["record"] for r in rules_of(*RULES) if "record" in r):
        assert record in readers, f"{record} is recorded but nothing reads it"


# --- Alertmanager ---------------------------------------------------------------------------


def test_alertmanager_config_checks() -> None:
    done = tool("amtool", "check-config", str(ALERTMANAGER))
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_severity_reaches_its_own_receiver() -> None:
    severities = {r["labels"]["severity"] for r in rules_of(*RULES) if "alert" in r}
    assert severities == {"warning", "critical"}
    receivers = {r["name"]: r for r in yaml.safe_load(ALERTMANAGER.read_text())["receivers"]}
    for severity in severities:
        done = tool("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                    f"severity={severity}", "alertname=GptossAnything", "cluster=eu-1")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [severity]
        (hook,) = receivers[severity]["webhook_configs"]
        assert hook["url"].endswith(f"/{severity}") and hook["send_resolved"]


@pytest.mark.parametrize("config", CONFIGS)
def test_prometheus_sends_alerts_to_the_alertmanager(config: str) -> None:
    (manager,) = yaml.safe_load((ROOT / config).read_text())["alerting"]["alertmanagers"]
    ((target,),) = [group["targets"] for group in manager["static_configs"]]
    assert target.split(".")[0].split(":")[0] == "alertmanager" and target.endswith(":9093")


@pytest.mark.parametrize("config", CONFIGS)
def test_external_labels_name_the_cluster_and_region(config: str) -> None:
    labels = yaml.safe_load((ROOT / config).read_text())["global"]["external_labels"]
    assert labels["cluster"] == "${GPTOSS_CLUSTER}" and labels["region"] == "${GPTOSS_REGION}"


def test_the_central_prometheus_federates_every_gptoss_series() -> None:
    config = yaml.safe_load((PROMETHEUS / "central.yml").read_text())
    (federate,) = [j for j in config["scrape_configs"] if j["job_name"] == "federate"]
    assert federate["metrics_path"] == "/federate" and federate["honor_labels"] is True
    assert set(federate["params"]["match[]"]) == {'{job=~"gptoss-.*"}', '{__name__=~"gptoss:.*"}'}


# --- Grafana ----------------------------------------------------------------------------------


def test_dashboard_covers_the_issue() -> None:
    text = " ".join(dashboard_exprs())
    for metric in ("gptoss_time_to_first_token_seconds", "gptoss_e2e_request_latency_seconds",
                   "gptoss_inter_token_latency_seconds", "gptoss_request_time_per_output_token_seconds",
                   "gptoss_generation_tokens_total", "gptoss:requests_waiting_by_base:sum",
                   "gptoss_request_queue_time_seconds", "gptoss_admission_decisions_total",
                   "gptoss_routing_decisions_total", "gptoss_cache_hits_total", "gptoss_memory_pressure",
                   "gptoss:error_ratio:rate5m", "gptoss:availability:ratio_rate5m",
                   "gptoss:ttft_seconds_by_model:p95_5m", "gptoss:e2e_seconds_by_model:p95_5m"):  # fmt: skip
        assert metric in text, metric


def test_every_panel_reads_the_selected_clusters() -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["cluster"]["includeAll"] and variables["cluster"]["allValue"] == ".*"
    for expr in dashboard_exprs():
        selectors = re.findall(r"\bgptoss[_:][a-zA-Z0-9_:]*(\{[^}]*\})?", expr)
        assert selectors and all(s.startswith('{cluster=~"$cluster"') for s in selectors), expr


def test_the_queue_panel_reads_what_keda_scales_on() -> None:
    queries = {t["metadata"]["query"] for d in yaml.safe_load_all(AUTOSCALING.read_text()) if d
               for t in d["spec"]["triggers"]}  # fmt: skip
    panel = next(
        p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Queue depth")
    )
    waiting = panel["targets"][0]["expr"]
    assert waiting == 'gptoss:requests_waiting_by_base:sum{cluster=~"$cluster", base=~"$queue|incoming"}'
    assert queries == {
        f'gptoss:requests_waiting_by_base:sum{{base="{q}"}}' for q in ("gpu-single", "gpu-multi")
    }


def test_dashboard_exemplars_link_to_traces() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = {d["uid"]: d for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert used == {"prometheus"}
    (link,) = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert (
        link == {"name": "trace_id", "datasourceUid": "jaeger"} and datasources["jaeger"]["type"] == "jaeger"
    )
    with_exemplars = {
        p["title"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("exemplar")
    }
    assert any("Time to first token" in title for title in with_exemplars)
    assert any("End-to-end" in title for title in with_exemplars)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules: dict[str, Any] = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())
    ]}]}  # fmt: skip
    file = tmp_path / "dashboard.yml"
    file.write_text(yaml.safe_dump(rules))
    done = tool("promtool", "check", "rules", str(file))
    assert done.returncode == 0, done.stdout + done.stderr


def test_used_names_follow_the_catalogue_conventions() -> None:
    names = used_metric_names()
    assert names, "the rules and the dashboard read gptoss_ metrics"
    # Counters are read with their _total suffix, histograms through _bucket (or _count/_sum).
    histograms = {n for n in names if n.endswith("_bucket")}
    assert all(n.endswith(("_seconds_bucket", "_per_second_bucket")) for n in histograms)
