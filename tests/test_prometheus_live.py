"""The real processes against the monitoring files: every metric the rules and the dashboard read is
served, the series fixture the rule tests are held to is what a healthy stack exports, and a real
Prometheus (Debian's) scraping the stack after traffic with a failure answers every dashboard
panel, counts the first failure, and hands everything to a central Prometheus with its cluster."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.jobstore.rqstore import open_queue
from tests import exported_series
from tests.conftest import DASHBOARD, Processes, http_ok, poll_job, process_env, used_metric_names, wait_for
from tests.monitoring import Server, as_promql, central_config, cluster_config, fast_rules, prometheus

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
CLUSTER = {"GPTOSS_CLUSTER": "eu-test-1", "GPTOSS_REGION": "eu-test"}
"""Where the test's Prometheus says it runs (its external labels, from the environment)."""


@dataclass(frozen=True)
class Stack:
    base: str
    targets: dict[str, list[str]]  # Prometheus job name -> host:port of its /metrics
    logs: Path
    redis_url: str
    healthy: dict[str, set[str]]  # Prometheus job name -> its series after one job, before any failure


def scrape(host: str) -> str:
    return requests.get(f"http://{host}/metrics", timeout=5).text


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API, scheduler and a worker per queue on tiny-gpt-oss, each /metrics on its own port; one job done.
    The API starts first and is probed before anything else runs, so /readyz answers 503 once, as
    it does in every real start."""
    folder = tmp_path_factory.mktemp("monitored")
    Redis.from_url(redis_url).flushall()
    procs = Processes(folder)
    port, scheduler_port = free_port(), free_port()
    worker_ports = {q: free_port() for q in keys.WORKER_QUEUES}
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_API_PORT=port, GPTOSS_SCHEDULER_METRICS_PORT=scheduler_port, GPTOSS_TRACE_SAMPLE_RATIO=1.0,
        GPTOSS_HEARTBEAT_INTERVAL=0.5, **CLUSTER,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    dead = lambda: any(child.poll() is not None for child in procs.children)  # noqa: E731
    why = lambda: "\n".join(f"== {f.name}\n{f.read_text()[-1500:]}" for f in folder.glob("*.log"))  # noqa: E731
    try:
        procs.start("api", ["api"], env)
        wait_for(lambda: http_ok(f"{base}/healthz") or dead(), 60, "the API to answer")
        assert not dead(), why()
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 503  # no scheduler, no worker yet
        procs.start("scheduler", ["scheduler"], env)
        for queue, worker_port in worker_ports.items():
            procs.start(
                queue,
                ["workers"],
                {**env, "GPTOSS_WORKER_QUEUE": queue, "GPTOSS_WORKER_METRICS_PORT": str(worker_port)},
            )
        wait_for(lambda: http_ok(f"{base}/readyz") or dead(), 120, "the stack to be ready")
        assert not dead(), why()
        job = requests.post(f"{base}/v1/jobs", json={"prompt": "Hello", "max_tokens": 4}, timeout=5).json()
        assert poll_job(base, job["id"], 60)["status"] == "finished"
        targets = {
            "gptoss-api": [f"127.0.0.1:{port}"],
            "gptoss-scheduler": [f"127.0.0.1:{scheduler_port}"],
            "gptoss-worker": [f"127.0.0.1:{p}" for p in worker_ports.values()],
        }
        healthy = {job: set().union(*(exported_series.scraped(scrape(h)) for h in hosts))
                   for job, hosts in targets.items()}  # fmt: skip
        yield Stack(base, targets, folder, redis_url, healthy)
    finally:
        procs.stop_all()


def served_names(host: str) -> set[str]:
    """Every sample name one /metrics can serve: declared families with their type's suffixes."""
    names = set()
    for family in text_string_to_metric_families(scrape(host)):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def test_every_metric_in_rules_and_dashboard_is_served(stack: Stack) -> None:
    served: set[str] = set()
    for hosts in stack.targets.values():
        for host in hosts:
            served |= served_names(host)
    missing = sorted(used_metric_names() - served)
    assert not missing, (
        f"read by compose/prometheus/rules or the Grafana dashboard, served by no process: {missing}"
    )


def test_the_series_fixture_is_what_a_healthy_stack_exports(stack: Stack) -> None:
    """compose/prometheus/tests/exported_series.yml (what the promtool tests may feed) is exported by
    the live stack; GPTOSS_WRITE_SERIES_FIXTURE=1 writes it from this scrape instead."""
    if os.environ.get("GPTOSS_WRITE_SERIES_FIXTURE") == "1":
        exported_series.write(stack.healthy)
    fixture = exported_series.load()
    assert set(fixture) == set(stack.targets)
    missing = {job: sorted(series - stack.healthy[job]) for job, series in fixture.items()}
    assert not any(missing.values()), (
        f"in the fixture, not exported (GPTOSS_WRITE_SERIES_FIXTURE=1): {missing}"
    )
    # What makes the first failure count: its series exist, at 0, before anything failed.
    assert any(
        s.startswith("gptoss_jobs_total{") and 'status="failed"' in s for s in fixture["gptoss-worker"]
    )
    assert any(
        s.startswith("gptoss_http_requests_total{") and 'status="500"' in s for s in fixture["gptoss-api"]
    )


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def wait_for_every_panel(server: Server, cluster: str) -> None:
    """Every dashboard query returns data from `server` (within a minute), else name the empty ones."""
    empty: list[str] = []

    def answered() -> bool:
        empty[:] = [
            f"{title}: {expr}"
            for title, expr in panel_queries()
            if not server.query(as_promql(expr, cluster))
        ]
        return not empty

    try:
        wait_for(answered, 60, "every dashboard panel to have data", interval=1)
    except AssertionError:
        raise AssertionError(f"panels without data (cluster {cluster}):\n" + "\n".join(empty)) from None


def fail_a_job(stack: Stack) -> None:
    """One job that fails in the worker (a temperature no request could ask for, put on gpu-single
    past the API's validation)."""
    failing = open_queue(keys.SINGLE_QUEUE, Redis.from_url(stack.redis_url)).enqueue(
        keys.GENERATE_FUNC, {"prompt": "x", "temperature": 99}, failure_ttl=300
    )
    wait_for(lambda: failing.get_status(refresh=True) == "failed", 30, "the bad job to fail")


def test_real_prometheus_answers_every_panel_after_a_failure(stack: Stack, tmp_path: Path) -> None:
    config = cluster_config(stack.targets, fast_rules(tmp_path / "rules"), alertmanager=None)
    with prometheus(tmp_path / "cluster", config, env=CLUSTER) as cluster:
        wait_for(
            lambda: len([r for r in cluster.query("up") if r["value"][1] == "1"]) == 4, 30, "every target up"
        )
        # Traffic while Prometheus watches: two jobs that finish and one that fails.
        for prompt in ("Hi", "The quick brown fox jumps over the lazy dog."):
            job = requests.post(
                f"{stack.base}/v1/jobs", json={"prompt": prompt, "max_tokens": 4}, timeout=5
            ).json()
            assert poll_job(stack.base, job["id"], 60)["status"] == "finished"
        fail_a_job(stack)
        # The first failure is a rate: its series was there, at 0, before it.
        counted = 'gptoss:error_ratio:rate5m{model="tiny-gpt-oss"} > 0'
        wait_for(lambda: bool(cluster.query(counted)), 30, "the first failure in the error ratio")
        wait_for(lambda: bool(cluster.query("gptoss:availability:ratio_rate5m == 1")), 30, "availability")
        p95 = cluster.query(
            "histogram_quantile(0.95, sum by (le) (gptoss_time_to_first_token_seconds_bucket))"
        )
        assert len(p95) == 1 and 0 < float(p95[0]["value"][1]) < 80
        wait_for_every_panel(cluster, ".*")
        # Every rule evaluates without error against the real series.
        groups = requests.get(f"{cluster.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] == "err"]
        assert not broken
        # Scraped as OpenMetrics, the histograms kept their exemplars: trace ids to open in Jaeger.
        exemplars = requests.get(
            f"{cluster.url}/api/v1/query_exemplars",
            params={"query": "gptoss_time_to_first_token_seconds_bucket", "start": "0", "end": "9999999999"},
            timeout=5,
        ).json()["data"]
        assert any("trace_id" in e["labels"] for series in exemplars for e in series["exemplars"]), exemplars

        # A central Prometheus federating this one: the same panels, for this cluster by name.
        host = cluster.url.removeprefix("http://")
        with prometheus(tmp_path / "central", central_config([host])) as central:
            wait_for_every_panel(central, CLUSTER["GPTOSS_CLUSTER"])
            (ratio,) = central.query(counted)
            assert ratio["metric"]["cluster"] == CLUSTER["GPTOSS_CLUSTER"]
            assert ratio["metric"]["region"] == CLUSTER["GPTOSS_REGION"]
            assert not central.query('gptoss:error_ratio:rate5m{cluster="another-cluster"}')
