"""The real processes against the monitoring files: every metric the rules and the dashboard read is
served, and a real Prometheus (Debian's) scrapes the stack, evaluates the rules and sees TTFT."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from cli.up import free_port
from shared import keys
from tests.conftest import RULES, Processes, http_ok, poll_job, process_env, used_metric_names, wait_for

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


@dataclass(frozen=True)
class Stack:
    base: str
    targets: dict[str, list[str]]  # Prometheus job name -> host:port of its /metrics
    logs: Path


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API, scheduler and a worker per queue on tiny-gpt-oss, each /metrics on its own port; one job done."""
    folder = tmp_path_factory.mktemp("monitored")
    Redis.from_url(redis_url).flushall()
    procs = Processes(folder)
    port, scheduler_port = free_port(), free_port()
    worker_ports = {q: free_port() for q in keys.WORKER_QUEUES}
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_API_PORT=port, GPTOSS_SCHEDULER_METRICS_PORT=scheduler_port, GPTOSS_TRACE_SAMPLE_RATIO=1.0,
        GPTOSS_HEARTBEAT_INTERVAL=0.5,
    )  # fmt: skip
    procs.start("api", ["api"], env)
    procs.start("scheduler", ["scheduler"], env)
    for queue, worker_port in worker_ports.items():
        procs.start(
            queue,
            ["workers"],
            {**env, "GPTOSS_WORKER_QUEUE": queue, "GPTOSS_WORKER_METRICS_PORT": str(worker_port)},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        dead = lambda: any(child.poll() is not None for child in procs.children)  # noqa: E731
        wait_for(lambda: http_ok(f"{base}/readyz") or dead(), 120, "the stack to be ready")
        assert not dead(), "\n".join(f"== {f.name}\n{f.read_text()[-1500:]}" for f in folder.glob("*.log"))
        job = requests.post(f"{base}/v1/jobs", json={"prompt": "Hello", "max_tokens": 4}, timeout=5).json()
        assert poll_job(base, job["id"], 60)["status"] == "finished"
        yield Stack(
            base,
            {
                "gptoss-api": [f"127.0.0.1:{port}"],
                "gptoss-scheduler": [f"127.0.0.1:{scheduler_port}"],
                "gptoss-worker": [f"127.0.0.1:{p}" for p in worker_ports.values()],
            },
            folder,
        )
    finally:
        procs.stop_all()


def served_names(url: str) -> set[str]:
    """Every sample name one /metrics can serve: declared families with their type's suffixes."""
    names = set()
    for family in text_string_to_metric_families(requests.get(url, timeout=5).text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def test_every_metric_in_rules_and_dashboard_is_served(stack: Stack) -> None:
    served: set[str] = set()
    for hosts in stack.targets.values():
        for host in hosts:
            served |= served_names(f"http://{host}/metrics")
    missing = sorted(used_metric_names() - served)
    assert not missing, (
        f"read by compose/prometheus/rules or the Grafana dashboard, served by no process: {missing}"
    )


def test_real_prometheus_scrapes_the_stack(stack: Stack, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus must be on PATH (Debian's package; scripts/setup installs it)"
    rules = tmp_path / "rules"
    rules.mkdir()
    for file in RULES:
        shutil.copy(file, rules / file.name)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules / "*.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in stack.targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = open(tmp_path / "prometheus.log", "wb")
    prometheus = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"), 30, "Prometheus to be ready")

        def query(expr: str) -> list[dict]:
            body = requests.get(f"{api}/query", params={"query": expr}, timeout=5).json()
            assert body["status"] == "success", body
            return body["data"]["result"]

        def all_up() -> bool:
            return len([r for r in query("up") if r["value"][1] == "1"]) == 4

        wait_for(all_up, 30, "every process to be scraped")
        # A second request, so the TTFT histogram grows while Prometheus watches.
        job = requests.post(f"{stack.base}/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}, timeout=5).json()
        assert poll_job(stack.base, job["id"], 60)["status"] == "finished"
        ttft = 'sum by (model) (gptoss_time_to_first_token_seconds_count{model="tiny-gpt-oss"})'
        wait_for(lambda: any(float(r["value"][1]) >= 2 for r in query(ttft)), 30, "both requests' TTFT")
        p95 = query("histogram_quantile(0.95, sum by (le) (gptoss_time_to_first_token_seconds_bucket))")
        assert len(p95) == 1 and 0 < float(p95[0]["value"][1]) < 80
        wait_for(lambda: bool(query("gptoss:ttft_seconds_by_model:p95_5m")), 30, "the recording rule")
        # Every rule evaluates without error against the real series.
        groups = requests.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] == "err"]
        assert not broken
        # Scraped as OpenMetrics, the histogram kept its exemplars: trace ids to open in Jaeger.
        exemplars = requests.get(
            f"{api}/query_exemplars",
            params={"query": "gptoss_time_to_first_token_seconds_bucket", "start": "0", "end": "9999999999"},
            timeout=5,
        ).json()["data"]
        assert any("trace_id" in e["labels"] for series in exemplars for e in series["exemplars"]), exemplars
    finally:
        prometheus.terminate()
        prometheus.wait(30)
