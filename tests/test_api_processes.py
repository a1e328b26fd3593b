"""Several API processes on one port, scraped as one: any process's `/metrics` holds every process's
series, each labelled `api_process`, with exemplars; the Redis gauges once; a killed process's
replacement takes its slot."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from redis import Redis

from api.process_metrics import SLOT_LABEL, ProcessSlot, merge, read_series, serve_own_series
from cli.up import free_port
from shared.settings import Settings
from tests.conftest import Processes, process_env, wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
JOB = {"messages": [{"role": "user", "content": "Count me."}], "max_tokens": 2, "temperature": 0}
SUBMITTED = ("gptoss_http_requests_total", {"method": "POST", "route": "/v1/jobs", "status": "202"})
DURATION_BUCKET = "gptoss_http_request_duration_seconds_bucket"
STATE_GAUGES = ("gptoss_requests_waiting", "gptoss_registry_jobs", "gptoss_workers_live", "gptoss_redis_up")

ONE = """# HELP gptoss_http_requests HTTP requests answered
# TYPE gptoss_http_requests counter
gptoss_http_requests_total{method="POST",route="/v1/jobs",status="202"} 3.0
# HELP gptoss_http_request_duration_seconds Time to answer an HTTP request
# TYPE gptoss_http_request_duration_seconds histogram
gptoss_http_request_duration_seconds_bucket{le="0.1",method="POST",route="/v1/jobs"} 2.0 # {trace_id="0af7651916cd43dd8448eb211c80319c"} 0.05 1700000000.5
gptoss_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/v1/jobs"} 3.0
gptoss_http_request_duration_seconds_count{method="POST",route="/v1/jobs"} 3.0
gptoss_http_request_duration_seconds_sum{method="POST",route="/v1/jobs"} 0.4
# EOF
"""  # noqa: E501
TWO = """# HELP gptoss_http_requests HTTP requests answered
# TYPE gptoss_http_requests counter
gptoss_http_requests_total{method="POST",route="/v1/jobs",status="202"} 5.0
# HELP gptoss_cache_hits Response cache hits
# TYPE gptoss_cache_hits counter
gptoss_cache_hits_total{model="smollm2-135m"} 1.0
# EOF
"""


class Families(Collector):
    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def test_merge_labels_each_process_and_keeps_exemplars() -> None:
    families, merged = merge({"0": ONE, "1": TWO, "2": "not openmetrics {"})
    assert merged == ["0", "1"]  # the malformed text is left out whole
    by_name = {f.name: f for f in families}
    counts = {s.labels[SLOT_LABEL]: s.value for s in by_name["gptoss_http_requests"].samples}
    assert counts == {"0": 3.0, "1": 5.0}
    assert [s.labels for s in by_name["gptoss_cache_hits"].samples] == [
        {"model": "smollm2-135m", SLOT_LABEL: "1"}
    ]
    bucket = by_name["gptoss_http_request_duration_seconds"].samples[0]
    assert bucket.labels == {"le": "0.1", "method": "POST", "route": "/v1/jobs", SLOT_LABEL: "0"}
    assert bucket.exemplar and bucket.exemplar.labels == {"trace_id": "0af7651916cd43dd8448eb211c80319c"}

    text = generate_latest(Families(families)).decode()  # what a scrape serves, parsed back
    assert re.search(
        r'^gptoss_http_request_duration_seconds_bucket\{api_process="0",le="0.1",.*\} 2.0 '
        r'# \{trace_id="0af7651916cd43dd8448eb211c80319c"\} 0.05',
        text,
        re.M,
    )
    again = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(again["gptoss_http_requests"].samples) == 2


def test_a_slot_is_held_until_its_holder_lets_go(tmp_path: Path) -> None:
    first, second = ProcessSlot.claim(tmp_path, 2), ProcessSlot.claim(tmp_path, 2)
    assert (first.index, second.index) == (0, 1) and second.siblings() == [0]
    first.release()  # as a dead process's lock is released
    replacement = ProcessSlot.claim(tmp_path, 2)
    assert replacement.index == 0
    replacement.release()
    second.release()


def test_a_process_serves_its_series_on_its_socket(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Counter("gptoss_jobs_submitted", "Jobs", ["model"], registry=registry).labels("m").inc(4)
    path = tmp_path / "metrics-0.sock"
    path.touch()  # a dead predecessor's leftover
    server = serve_own_series(registry, path)
    try:
        text = read_series(path)
        assert text is not None and 'gptoss_jobs_submitted_total{model="m"} 4.0' in text
        assert read_series(tmp_path / "metrics-1.sock") is None  # nobody there: skipped
    finally:
        server.shutdown()
        server.server_close()


def test_one_process_serves_no_process_label(settings, redis: Redis) -> None:
    from api import create_app

    text = create_app(settings(), redis).test_client().get("/metrics").text
    assert 'gptoss_requests_waiting{queue="incoming"} 0.0' in text
    assert "gptoss_jobs_submitted_total" in text and SLOT_LABEL not in text


# --- two processes behind one port -----------------------------------------------------------------


@dataclass
class Api:
    base: str
    master: psutil.Process
    made: int = 0
    traces: set[str] = field(default_factory=set)

    def submit(self, count: int) -> None:
        """`count` submissions at once (so both processes take some), each trace forced."""

        def one(_: int) -> str:
            answer = requests.post(
                f"{self.base}/v1/jobs", json=JOB, headers={"X-Force-Trace": "1"}, timeout=30
            )
            assert answer.status_code == 202, answer.text
            return answer.headers["X-Trace-ID"]

        with ThreadPoolExecutor(count) as pool:
            ids = list(pool.map(one, range(count)))
        self.made += count
        self.traces.update(ids)

    def submit_until_both_served(self) -> None:
        """Submit in rounds until each process has answered some submissions."""

        def both_served() -> bool:
            self.submit(8)
            served = values(self.scrape(), SUBMITTED[0], **SUBMITTED[1])
            return set(served) == {"0", "1"} and all(served.values())

        wait_for(both_served, 60, "both API processes to take submissions", interval=0.01)

    def scrape(self) -> dict[str, Metric]:
        answer = requests.get(f"{self.base}/metrics", headers={"Accept": OPENMETRICS}, timeout=10)
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
        return {f.name: f for f in text_string_to_metric_families(answer.text)}


def values(families: dict[str, Metric], name: str, **labels: str) -> dict[str | None, float]:
    """Value of each process's `name` sample with `labels` (None: a sample without the label)."""
    return {
        s.labels.get(SLOT_LABEL): s.value
        for f in families.values()
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    }


@pytest.fixture
def api(redis_url: str, redis: Redis, prepared_models: Settings, processes: Processes) -> Api:
    port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
        GPTOSS_MODEL="smollm2-135m", GPTOSS_API_PROCESSES=2, GPTOSS_OBSERVABILITY="true",
        GPTOSS_ENVIRONMENT="production", GPTOSS_TENANT_BACKLOG_BUDGET=1000,
    )  # fmt: skip
    child = processes.start("api", ["api"], env)
    api = Api(f"http://127.0.0.1:{port}", psutil.Process(child.pid))

    def both_up() -> bool:
        try:
            scraped = values(api.scrape(), "gptoss_api_processes_scraped")
        except requests.RequestException:
            return False
        return scraped == {None: 2.0}

    wait_for(both_up, 120, "two API processes answering scrapes")
    return api


def test_one_scrape_counts_every_process(api: Api) -> None:
    api.submit_until_both_served()
    families: dict[str, Metric] = {}

    def whole() -> bool:  # a process starved of CPU past the timeout is left out of a scrape
        nonlocal families
        families = api.scrape()
        return values(families, "gptoss_api_processes_scraped") == {None: 2.0}

    wait_for(whole, 30, "a scrape that reached both processes")
    assert sum(values(families, SUBMITTED[0], **SUBMITTED[1]).values()) == api.made
    assert sum(values(families, "gptoss_jobs_submitted_total", model="smollm2-135m").values()) == api.made

    # Exemplars survive the merge, per process, and name the forced traces the API answered with.
    for slot in ("0", "1"):
        exemplars = [
            s.exemplar.labels["trace_id"]
            for s in families["gptoss_http_request_duration_seconds"].samples
            if s.name == DURATION_BUCKET and s.exemplar
            and s.labels.get("route") == "/v1/jobs" and s.labels[SLOT_LABEL] == slot
        ]  # fmt: skip
        assert exemplars and set(exemplars) <= api.traces, slot

    # The gauges read from Redis appear once, unlabelled, and count every process's jobs.
    for name in STATE_GAUGES:
        assert families[name].samples and all(SLOT_LABEL not in s.labels for s in families[name].samples)
    assert values(families, "gptoss_requests_waiting", queue="incoming") == {None: float(api.made)}


def test_a_killed_process_is_replaced_in_its_slot(api: Api) -> None:
    api.submit_until_both_served()
    before = values(api.scrape(), "gptoss_jobs_submitted_total", model="smollm2-135m")
    workers = api.master.children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    found: dict[str | None, float] = {}

    def replaced() -> bool:
        nonlocal found
        if {p.pid for p in api.master.children()} & {workers[0].pid}:
            return False
        families = api.scrape()
        found = values(families, "gptoss_jobs_submitted_total", model="smollm2-135m")
        return values(families, "gptoss_api_processes_scraped") == {None: 2.0} and 0.0 in found.values()

    wait_for(replaced, 60, "gunicorn to replace the killed process in its slot")
    assert set(found) == {"0", "1"} and len(api.master.children()) == 2
    # The replacement counts from zero in the dead process's series; the survivor's count is intact.
    (restarted,) = [slot for slot, count in found.items() if count == 0.0]
    (survivor,) = [slot for slot in found if slot != restarted]
    assert found[survivor] == before[survivor] and before[restarted] > 0
