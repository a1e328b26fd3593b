"""Prometheus config and rules pass promtool, every alert fires in a unit test, the dashboard is sound."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DASHBOARD, RULES, dashboard_exprs, used_metric_names

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "compose" / "prometheus"
ALERT_TESTS = PROMETHEUS / "tests" / "alerts_test.yml"
DATASOURCES = ROOT / "compose" / "grafana" / "provisioning" / "datasources" / "gptoss.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool must be on PATH (Debian's prometheus package; scripts/setup installs it)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("config", ["compose/prometheus/prometheus.yml", "compose/k8s/prometheus.yml"])
def test_config_checks(config: str) -> None:
    done = promtool("check", "config", "--syntax-only", config)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_config_with_its_rules_checks() -> None:
    done = promtool("check", "config", "compose/prometheus/prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(RULES)} rule files found" in done.stdout


def test_rules_check() -> None:
    done = promtool("check", "rules", *map(str, RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def alert_names() -> set[str]:
    rules = [r for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]
    return {r["alert"] for r in rules if "alert" in r}


def test_every_alert_fires_in_a_test_and_is_silent_when_healthy() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    healthy = next(t for t in tests if t["name"] == "healthy stack is silent")
    silent = {c["alertname"] for c in healthy["alert_rule_test"] if c["exp_alerts"] == []}
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c["exp_alerts"]}
    assert alert_names() <= silent
    assert alert_names() <= fired


def test_ttft_sla_per_model() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "alerts.yml").read_text())["groups"][0]["rules"]
    sla = {r["labels"]["sla_seconds"]: r["expr"] for r in rules if r.get("alert") == "GptossTTFTOverSLA"}
    assert sla == {
        "2": 'gptoss:ttft_seconds_by_model:p95_5m{model="gpt-oss-20b"} > 2',
        "5": 'gptoss:ttft_seconds_by_model:p95_5m{model="gpt-oss-120b"} > 5',
    }


# --- Grafana ----------------------------------------------------------------------------------


def test_dashboard_covers_the_issue() -> None:
    text = " ".join(dashboard_exprs())
    for metric in ("gptoss_time_to_first_token_seconds", "gptoss_e2e_request_latency_seconds",
                   "gptoss_inter_token_latency_seconds", "gptoss_generation_tokens_total",
                   "gptoss_requests_waiting", "gptoss_request_queue_time_seconds",
                   "gptoss_admission_decisions_total", "gptoss_routing_decisions_total",
                   "gptoss_cache_hits_total", "gptoss_memory_pressure",
                   "gptoss:error_ratio:rate5m"):  # fmt: skip
        assert metric in text, metric


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


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so promtool can parse it."""
    return expr.replace("$__rate_interval", "5m").replace("$model", ".*").replace("$queue", ".*")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules: dict[str, Any] = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())
    ]}]}  # fmt: skip
    file = tmp_path / "dashboard.yml"
    file.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(file))
    assert done.returncode == 0, done.stdout + done.stderr


def test_used_names_follow_the_catalogue_conventions() -> None:
    names = used_metric_names()
    assert names, "the rules and the dashboard read gptoss_ metrics"
    # Counters are read with their _total suffix, histograms through _bucket (or _count/_sum).
    histograms = {n for n in names if n.endswith("_bucket")}
    assert all(n.endswith(("_seconds_bucket", "_per_second_bucket")) for n in histograms)
