"""Observability end to end: one trace across processes, OpenMetrics exemplars, JSON logs, the
debug bundle. Real processes on the test Redis, the embedded SmolLM2, spans written to files."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.jobstore.rqstore import open_queue
from tests.conftest import Processes, http_ok, poll_job, process_env, wait_for

ADMIN_KEY = "planted-admin-secret-7f3a"
SECRET_PROMPT = "zebra-orchid-4417"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass(frozen=True)
class Observed:
    base: str
    scheduler_metrics: str
    worker_metrics: dict[str, str]
    trace_dir: Path
    logs: Path


@pytest.fixture(scope="module")
def observed(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    folder = tmp_path_factory.mktemp("observed")
    Redis.from_url(redis_url).flushall()
    procs = Processes(folder)
    port, scheduler_port = free_port(), free_port()
    worker_ports = {q: free_port() for q in keys.WORKER_QUEUES}
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
        GPTOSS_TRACE_DIR=folder / "spans", GPTOSS_TRACE_SAMPLE_RATIO=1.0, GPTOSS_ADMIN_KEY=ADMIN_KEY,
        GPTOSS_SCHEDULER_METRICS_PORT=scheduler_port, GPTOSS_MULTI_GPU_THRESHOLD=64,
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
        wait_for(lambda: http_ok(f"{base}/readyz"), 120, "the stack to be ready")
        yield Observed(
            base,
            f"http://127.0.0.1:{scheduler_port}/metrics",
            {q: f"http://127.0.0.1:{p}/metrics" for q, p in worker_ports.items()},
            folder / "spans",
            folder,
        )
    finally:
        procs.stop_all()


def submit(base: str, content: str, headers: dict[str, str] | None = None) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    answer = requests.post(f"{base}/v1/jobs", json=body, headers=headers or {}, timeout=10)
    assert answer.status_code == 202, answer.text
    return poll_job(base, answer.json()["id"])


FINAL_SPANS = {"POST /v1/jobs", "scheduler.schedule", "worker.job"}
"""Spans each process ends last for a job: once all are exported, the trace is complete."""


def spans_of(trace_dir: Path, trace_id: str, timeout: float = 10.0) -> list[dict]:
    """Every finished span of `trace_id`, from every process's span file."""
    found: list[dict] = []

    def collect() -> bool:
        nonlocal found
        found = [
            span
            for path in trace_dir.glob("*.jsonl")
            for line in path.read_text().splitlines()
            if (span := json.loads(line))["context"]["trace_id"] == f"0x{trace_id}"
        ]
        services = {s["resource"]["attributes"]["service.name"] for s in found}
        # Each process exports in batches: a worker's early Redis span can land before its job span.
        names = {s["name"] for s in found}
        return {"gptoss-api", "gptoss-scheduler", "gptoss-worker"} <= services and FINAL_SPANS <= names

    wait_for(collect, timeout, f"spans of trace {trace_id} from all three processes")
    return found


def test_one_trace_across_api_scheduler_and_worker(observed: Observed) -> None:
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    view = submit(observed.base, "Name a colour.", {"traceparent": f"00-{client_trace}-{client_span}-01"})
    assert view["status"] == "finished" and view["trace_id"] == client_trace
    spans = spans_of(observed.trace_dir, client_trace)
    by_name = {s["name"]: s for s in spans}
    by_id = {s["context"]["span_id"]: s for s in spans}
    service = {s["context"]["span_id"]: s["resource"]["attributes"]["service.name"] for s in spans}

    api_span = by_name["POST /v1/jobs"]
    assert api_span["parent_id"] == f"0x{client_span}"  # the client's context was honoured
    schedule = by_name["scheduler.schedule"]
    assert schedule["parent_id"] == api_span["context"]["span_id"]
    route = by_name["scheduler.route"]
    assert by_id[route["parent_id"]]["name"] == "scheduler.schedule"
    assert route["attributes"]["gptoss.route.queue"] == "gpu-single"
    job = by_name["worker.job"]
    assert (
        job["parent_id"] == route["context"]["span_id"]
        and service[job["context"]["span_id"]] == "gptoss-worker"
    )
    generation = next(s for s in spans if s["name"].startswith("chat "))
    assert generation["parent_id"] == job["context"]["span_id"]
    attrs = generation["attributes"]
    assert attrs["gen_ai.request.model"] == "smollm2-135m"
    assert attrs["gen_ai.usage.output_tokens"] == view["result"]["usage"]["completion_tokens"]
    assert attrs["gen_ai.usage.input_tokens"] == view["result"]["usage"]["prompt_tokens"]
    assert "queue.wait gpu-single" in by_name and "queue.wait incoming" in by_name
    redis_spans = [s for s in spans if s["kind"] == "SpanKind.CLIENT"]
    assert redis_spans and all(s["parent_id"] for s in redis_spans)  # Redis calls inside the request


def test_histograms_carry_exemplars_of_recorded_traces(observed: Observed) -> None:
    view = submit(observed.base, "Say hello.")
    route = view["route"]["queue"]
    text = requests.get(observed.worker_metrics[route], headers={"Accept": OPENMETRICS}, timeout=5).text
    recorded = {s["context"]["trace_id"][2:] for s in spans_of(observed.trace_dir, view["trace_id"])}
    for histogram in ("gptoss_time_to_first_token_seconds", "gptoss_e2e_request_latency_seconds"):
        exemplars = re.findall(
            rf'^{histogram}_bucket{{[^}}]*}} \S+ # {{[^}}]*trace_id="([0-9a-f]{{32}})"', text, re.M
        )
        assert exemplars, f"no exemplar on {histogram}"
        assert view["trace_id"] in exemplars or set(exemplars) & recorded
    plain = requests.get(observed.worker_metrics[route], timeout=5).text
    assert "gptoss_generation_tokens_total" in plain and "# {" not in plain  # no exemplars in text format

    api = requests.get(f"{observed.base}/metrics", headers={"Accept": OPENMETRICS}, timeout=5)
    assert api.headers["Content-Type"].startswith("application/openmetrics-text")
    assert re.search(
        r'^gptoss_http_request_duration_seconds_bucket{.*route="/v1/jobs".*# {.*trace_id=', api.text, re.M
    )
    assert re.search(r'^gptoss_requests_waiting{queue="incoming"} 0', api.text, re.M)
    assert re.search(r'^gptoss_workers_live{queue="gpu-multi"} 1', api.text, re.M)
    scheduler = requests.get(observed.scheduler_metrics, headers={"Accept": OPENMETRICS}, timeout=5).text
    assert re.search(
        r'^gptoss_routing_decisions_total{queue="gpu-single",reason="within_threshold"} [1-9]',
        scheduler,
        re.M,
    )
    assert re.search(
        r'^gptoss_admission_decisions_total{outcome="admitted",reason="fits_context"} [1-9]', scheduler, re.M
    )


def test_every_log_line_of_a_request_is_json_with_ids_and_no_prompt(observed: Observed) -> None:
    view = submit(observed.base, f"Repeat the word {SECRET_PROMPT}.", {"X-Request-ID": "req-observed-1"})

    def read_lines() -> list[str]:
        return [line for path in observed.logs.glob("*.log") for line in path.read_text().splitlines()]

    # The job's last line: the worker's `job_finished` (or a cache hit's) names the job.
    wait_for(lambda: any(view["id"] in line and ("job_finished" in line or "cache_hit" in line)
                         for line in read_lines()), 30, "the job's last log line")  # fmt: skip
    lines = read_lines()
    assert not [line for line in lines if SECRET_PROMPT in line], "prompt text reached a log"
    # The request's lines: those of its POST and of its job (polls are requests of their own).
    mine = [line for line in lines if "req-observed-1" in line or f'"job_id": "{view["id"]}"' in line]
    events = [json.loads(line) for line in mine]  # every line of the request parses as JSON
    names = {e["event"] for e in events}
    assert {"request_received", "job_submitted", "admission_decided", "route_decided", "job_started",
            "first_token", "job_finished"} <= names  # fmt: skip
    for event in events:
        assert event["request_id"] == "req-observed-1", event
        assert event["trace_id"] == view["trace_id"], event


def test_debug_bundle(observed: Observed, redis_url: str) -> None:
    assert requests.get(f"{observed.base}/admin/debug-bundle", timeout=10).status_code == 401
    wrong = requests.get(
        f"{observed.base}/admin/debug-bundle", headers={"Authorization": "Bearer nope"}, timeout=10
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    failing = open_queue(keys.SINGLE_QUEUE, Redis.from_url(redis_url)).enqueue(
        keys.GENERATE_FUNC, {"prompt": "x", "temperature": 99}, failure_ttl=300
    )
    wait_for(lambda: failing.get_status(refresh=True) == "failed", 30, "the bad job to fail")

    answer = requests.get(
        f"{observed.base}/admin/debug-bundle", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:gz") as archive:
        files = {m.name.split("/", 1)[1]: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert all(ADMIN_KEY.encode() not in content for content in files.values()), "the admin key leaked"
    manifest = json.loads(files["manifest.json"])
    assert manifest["problems"] == {}
    settings = json.loads(files["settings.json"])
    assert settings["admin_key"] == "**********" and settings["multi_gpu_threshold"] == 64
    versions = json.loads(files["versions.json"])
    assert versions["packages"]["torch"] and versions["packages"]["transformers"] and versions["redis_server"]
    queues = json.loads(files["queues.json"])
    assert queues["gpu-single"]["failed"] >= 1 and queues["gpu-single"]["finished"] >= 1
    workers = json.loads(files["workers.json"])
    assert {w["queue"] for w in workers["heartbeats"]} == {"gpu-single", "gpu-multi"}
    assert len(workers["schedulers"]) == 1 and len(workers["rq_workers"]) == 2
    failures = json.loads(files["failures.json"])
    failed = next(f for f in failures if f["id"] == failing.id)
    assert "ValidationError" in failed["traceback"] and failed["meta"]["error"]["code"] == "generation_failed"
    decisions = json.loads(files["decisions.json"])
    assert decisions and {"job_id", "kind", "outcome", "reason"} <= set(decisions[0])
    metric_files = [name for name in files if name.startswith("metrics/")]
    assert "metrics/api.txt" in metric_files and len(metric_files) == 4  # api, scheduler, two workers
    assert any(b"gptoss_time_to_first_token_seconds" in files[name] for name in metric_files)
