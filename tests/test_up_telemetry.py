"""`gptoss up` started the way a user pipes it (stdout not a terminal), in cluster `eu-1`: stdout is
JSON lines only, each naming its cluster, region and instance; a fresh scrape of every process
already holds the zero series the rules read; a job's tokens are counted per gap (issue #21)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from cli.up import free_port
from tests.conftest import ROOT, http_ok, process_env, wait_for

IDENTITY = {"cluster": "eu-1", "region": "eu-west", "instance": "node-7"}
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass
class PipedUp:
    """A running `gptoss up` whose stdout and stderr go to files of their own."""

    base: str
    metrics: dict[str, str]  # process -> its /metrics URL
    up: subprocess.Popen
    stdout: Path
    stderr: Path
    fresh: dict[str, str]  # process -> its first scrape, before any request

    def stop(self) -> None:
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGINT)
            self.up.wait(60)


def two_free_ports() -> int:
    """A port that is free, and so is the next (`up` gives its two workers port and port + 1)."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


@pytest.fixture(scope="module")
def piped_up(prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipedUp]:
    """`gptoss up` on tiny-gpt-oss, stdout and stderr each to a file, spans to files."""
    folder = tmp_path_factory.mktemp("piped")
    port, scheduler_port, worker_port = free_port(), free_port(), two_free_ports()
    env = process_env(
        GPTOSS_API_PORT=port, GPTOSS_DATA_DIR=folder / "data", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_AUTH="true", GPTOSS_SCHEDULER_METRICS_PORT=scheduler_port,
        GPTOSS_WORKER_METRICS_PORT=worker_port, GPTOSS_TRACE_DIR=folder / "spans",
        GPTOSS_CLUSTER=IDENTITY["cluster"], GPTOSS_REGION=IDENTITY["region"],
        GPTOSS_INSTANCE=IDENTITY["instance"],
    )  # fmt: skip
    env.pop("GPTOSS_LOG_FORMAT")  # as a user runs it: JSON because stdout is not a terminal
    stdout, stderr = folder / "stdout.log", folder / "stderr.log"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        up = subprocess.Popen([sys.executable, "-m", "cli", "up"], env=env, cwd=ROOT, stdout=out, stderr=err)
    base = f"http://127.0.0.1:{port}"
    metrics = {
        "api": f"{base}/metrics",
        "scheduler": f"http://127.0.0.1:{scheduler_port}/metrics",
        "worker": f"http://127.0.0.1:{worker_port}/metrics",
    }
    stack = PipedUp(base, metrics, up, stdout, stderr, {})
    try:
        ready = lambda: all(http_ok(url) for url in [f"{base}/readyz", *metrics.values()])  # noqa: E731
        wait_for(lambda: ready() or up.poll() is not None, 180, "the stack to be ready")
        assert up.poll() is None, stderr.read_text()[-3000:]
        stack.fresh = {name: requests.get(url, timeout=5).text for name, url in metrics.items()}
        yield stack
    finally:
        stack.stop()


def stdout_lines(stack: PipedUp) -> list[str]:
    return stack.stdout.read_text().splitlines()


def test_a_fresh_scrape_holds_the_zero_series_the_rules_read(piped_up: PipedUp) -> None:
    fresh = piped_up.fresh
    worker = set(fresh["worker"].splitlines())
    for status in ("finished", "failed"):
        assert f'gptoss_jobs_total{{model="tiny-gpt-oss",status="{status}"}} 0.0' in worker
    assert 'gptoss_inter_token_latency_seconds_count{model="tiny-gpt-oss",queue="gpu-single"} 0.0' in worker
    assert 'gptoss_jobs_total{model="tiny-gpt-oss",status="rejected"} 0.0' in fresh["scheduler"].splitlines()
    assert 'gptoss_http_requests_total{method="POST",route="/v1/jobs",status="500"} 0.0' in fresh["api"]
    for name, text in fresh.items():
        info = (
            f'gptoss_process_info{{cluster="eu-1",instance="node-7",process="{name}",region="eu-west"}} 1.0'
        )
        assert info in text.splitlines(), name


def test_tokens_are_timed_per_gap_with_exemplars(piped_up: PipedUp) -> None:
    key = (piped_up.stdout.parent / "data" / "api-key").read_text().strip()
    body = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 12, "temperature": 0}
    answer = requests.post(
        f"{piped_up.base}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert answer.status_code == 202, answer.text
    view: dict = {}

    def ended() -> bool:
        nonlocal view
        view = requests.get(
            f"{piped_up.base}/v1/jobs/{answer.json()['id']}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=5,
        ).json()
        return view["status"] in ("finished", "failed", "rejected")

    wait_for(ended, 120, "the job to end", interval=0.2)
    assert view["status"] == "finished", view
    tokens = view["result"]["usage"]["completion_tokens"]
    assert tokens > 1
    text = requests.get(piped_up.metrics["worker"], headers={"Accept": OPENMETRICS}, timeout=5).text
    labels = '{model="tiny-gpt-oss",queue="gpu-single"}'
    lines = text.splitlines()
    assert f"gptoss_inter_token_latency_seconds_count{labels} {float(tokens - 1)}" in lines
    assert f"gptoss_request_time_per_output_token_seconds_count{labels} 1.0" in lines
    for histogram in ("gptoss_inter_token_latency_seconds", "gptoss_request_tokens_per_second"):
        exemplars = [line for line in lines if line.startswith(f"{histogram}_bucket") and "# {" in line]
        assert exemplars and view["trace_id"] in exemplars[0], histogram


def test_spans_carry_the_cluster(piped_up: PipedUp) -> None:
    spans = [json.loads(line) for path in piped_up.stdout.parent.glob("spans/*.jsonl")
             for line in path.read_text().splitlines()]  # fmt: skip
    assert spans
    for span in spans:
        attributes = span["resource"]["attributes"]
        assert attributes["gptoss.cluster"] == "eu-1" and attributes["gptoss.region"] == "eu-west"
        assert attributes["gptoss.instance"] == "node-7" and attributes["cloud.region"] == "eu-west"


def test_stdout_is_json_lines_only(piped_up: PipedUp) -> None:
    piped_up.stop()  # last in this module: its stopping lines are part of the output
    lines = stdout_lines(piped_up)
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"not JSON on stdout: {line!r}")
        assert isinstance(event, dict)
        assert {k: event.get(k) for k in IDENTITY} == IDENTITY, line
        events.append(event)
    processes = {e.get("process") for e in events}
    assert {"up", "api", "scheduler", "worker"} <= processes
    [banner] = [e for e in events if e["event"] == "stack_starting"]
    key = (piped_up.stdout.parent / "data" / "api-key").read_text().strip()
    assert banner["api_key"] == key and banner["api"] == piped_up.base
    output = piped_up.stdout.read_text() + piped_up.stderr.read_text()
    assert output.count(key) == 1, "the API key is printed once"
    assert [e["event"] for e in events if e.get("process") == "up"][-2:] == [
        "stack_stopping",
        "stack_stopped",
    ]
