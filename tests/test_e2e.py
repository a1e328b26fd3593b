"""End to end: the processes started the way a user starts them, on a real Redis and real models."""

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
from tests.conftest import ROOT, Processes, http_ok, poll_job, process_env, wait_for

THRESHOLD = 64
"""A low multi-GPU threshold, so a prompt of a few hundred tokens routes to gpu-multi."""


@dataclass(frozen=True)
class UpStack:
    """A running `gptoss up`: its API, its process and the file holding all its processes' output."""

    base: str
    up: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def stack(prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpStack]:
    """`gptoss up` on the embedded SmolLM2, with a Redis of its own."""
    folder = tmp_path_factory.mktemp("up")
    port = free_port()
    env = process_env(
        GPTOSS_API_PORT=port,
        GPTOSS_DATA_DIR=folder / "data",
        GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_MULTI_GPU_THRESHOLD=THRESHOLD,
    )
    log = open(folder / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "cli", "up"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{base}/readyz") or up.poll() is not None, 180, "the stack to be ready")
        assert up.poll() is None, (folder / "up.log").read_text()[-3000:]
        yield UpStack(base, up, folder / "up.log")
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(60)


def chat(base: str, content: str, **params: object) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, **params}
    response = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return poll_job(base, response.json()["id"])


def test_capital_of_france(stack) -> None:  # type: ignore[no-untyped-def]
    base = stack.base
    view = chat(base, "What is the capital of France?", max_tokens=24)
    assert view["status"] == "finished", view
    assert "Paris" in view["result"]["text"]
    assert view["route"]["queue"] == "gpu-single"
    assert view["result"]["queue"] == "gpu-single"
    usage = view["result"]["usage"]
    assert usage["prompt_tokens"] == view["route"]["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 24
    stamps = view["timestamps"]
    assert stamps["received"] <= stamps["scheduled"] <= stamps["started"] <= stamps["first_token"]
    assert stamps["first_token"] <= stamps["finished"]


def test_routing_by_prompt_size(stack) -> None:  # type: ignore[no-untyped-def]
    base = stack.base
    long_text = "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 30
    long_view = chat(base, long_text, max_tokens=4)
    short_view = chat(base, "Hi!", max_tokens=4)
    assert long_view["route"]["prompt_tokens"] > THRESHOLD >= short_view["route"]["prompt_tokens"]
    assert long_view["route"] == {**long_view["route"], "queue": "gpu-multi", "reason": "over_threshold"}
    assert short_view["route"]["queue"] == "gpu-single"
    # Each was served by the worker of its own queue.
    assert long_view["result"]["queue"] == "gpu-multi" and long_view["result"]["worker"].endswith("gpu-multi")
    assert short_view["result"]["queue"] == "gpu-single" and short_view["result"]["worker"].endswith(
        "gpu-single"
    )


def test_submit_command(stack) -> None:  # type: ignore[no-untyped-def]
    base = stack.base
    done = subprocess.run(
        [sys.executable, "-m", "cli", "submit", "What is the capital of France?", "--api-url", base],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=process_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "gpu-single" in done.stderr


def test_ctrl_c_stops_everything(stack) -> None:  # type: ignore[no-untyped-def]
    base, up = stack.base, stack.up
    children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 5  # redis, api, scheduler, two workers
    up.send_signal(signal.SIGINT)
    assert up.wait(60) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # the API is gone


def test_logs_are_json_without_prompt_text(stack) -> None:  # type: ignore[no-untyped-def]
    assert stack.up.poll() is not None  # runs after the stack stopped, so every line is written
    lines = [line for line in stack.log.read_text().splitlines() if line.startswith("{")]
    events = [json.loads(line) for line in lines]
    names = {e["event"] for e in events}
    assert {"job_submitted", "route_decided", "job_started", "job_finished", "request_handled"} <= names
    assert {e["process"] for e in events} >= {"api", "scheduler", "worker"}
    assert all("capital of France" not in line and "quick brown fox" not in line for line in lines)
    assert all(e.get("request_id") for e in events if e["event"] in ("route_decided", "job_finished"))


def test_readyz_follows_worker_heartbeats(
    redis, redis_url: str, processes: Processes, prepared_models
) -> None:  # type: ignore[no-untyped-def]
    """With real processes on the test Redis: unready until a worker per queue lives, and again after."""
    port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_HEARTBEAT_INTERVAL=0.5, GPTOSS_HEARTBEAT_TTL=2, GPTOSS_API_PORT=port,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    processes.start("api", ["api"], env)
    processes.start("scheduler", ["scheduler"], env)
    wait_for(lambda: http_ok(f"{base}/healthz"), 30, "the API")

    def reasons() -> list[str]:
        return requests.get(f"{base}/readyz", timeout=5).json()["reasons"]

    both_missing = [f"no live worker heartbeat on queue {q}" for q in ("gpu-single", "gpu-multi")]
    wait_for(lambda: reasons() == both_missing, 30, "only the workers to be missing")
    single = processes.start("single", ["workers"], {**env, "GPTOSS_WORKER_QUEUE": "gpu-single"})
    multi = processes.start("multi", ["workers"], {**env, "GPTOSS_WORKER_QUEUE": "gpu-multi"})
    wait_for(lambda: http_ok(f"{base}/readyz"), 60, "readiness with both workers")

    view = requests.post(f"{base}/v1/jobs", json={"prompt": "hi", "max_tokens": 3}, timeout=5).json()
    assert poll_job(base, view["id"], 60)["status"] == "finished"

    multi.send_signal(signal.SIGKILL)  # no clean exit: the heartbeat must expire by itself
    wait_for(
        lambda: reasons() == ["no live worker heartbeat on queue gpu-multi"], 10, "the dead worker to count"
    )
    single.send_signal(signal.SIGTERM)  # a clean stop removes its heartbeat at once
    assert single.wait(30) == 0
    assert "no live worker heartbeat on queue gpu-single" in reasons()
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 503
