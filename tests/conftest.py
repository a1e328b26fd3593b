"""Fixtures: a real redis-server per session (flushed per test), app and process factories."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.apikeys import create_key
from shared.connection import connect
from shared.heartbeat import WorkerBeat, publish, read_live
from shared.settings import Settings

if TYPE_CHECKING:  # the official client is a test extra; scripts/device-check runs without it
    import openai

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of the tests' own, on a free port, keeping nothing on disk."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server must be on PATH (.ci/run installs it)"
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except Exception:
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(10)


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    """A client of the session's Redis, emptied before each test."""
    client = connect(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str) -> Callable[..., Settings]:
    """Build Settings for the test's Redis, with overrides."""

    def make(**overrides: object) -> Settings:
        # Auth is off unless a test is about it (tests/test_auth.py turns it on); so is the response
        # cache (tests/test_cache.py), which would answer a test's repeated greedy request itself.
        return Settings(**{"redis_url": redis_url, "auth": False, "response_cache": False, **overrides})

    return make


@pytest.fixture(scope="session")
def prepared_models() -> Settings:
    """Both registry models prepared in the cache (converted once per machine)."""
    from shared.registry import model_spec
    from workers.model_store import prepare

    base = Settings()
    for name in ("smollm2-135m", "tiny-gpt-oss"):
        prepare(model_spec(name), base.cache_dir)
    return base


@pytest.fixture(scope="module")
def fp32_runtime(prepared_models: Settings) -> Any:
    """SmolLM2 in fp32 on the CPU, without a worker: batched greedy output must match a single run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.registry import model_spec
    from workers.runtime import ModelRuntime

    spec = model_spec("smollm2-135m")
    folder = spec.directory(prepared_models.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return ModelRuntime(spec, model, AutoTokenizer.from_pretrained(str(folder)), "cpu")


class FakeClock:
    """A clock a test moves by hand (unix seconds, starting now), for collaborators that take one."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward."""
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test moves it."""
    return FakeClock()


def process_env(**values: object) -> dict[str, str]:
    """The environment for a child process: ours without GPTOSS_* and with `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
    # Metrics endpoints off unless a test asks: fixed default ports would clash between processes.
    # The response cache too: it would answer a test's repeated greedy request (tests/test_cache.py).
    env.update(
        {"GPTOSS_SCHEDULER_METRICS_PORT": "0", "GPTOSS_WORKER_METRICS_PORT": "0", "GPTOSS_AUTH": "false",
         "GPTOSS_RESPONSE_CACHE": "false"}
    )  # fmt: skip
    env.update({k: str(v) for k, v in values.items()})
    env["GPTOSS_LOG_FORMAT"] = "json"
    return env


class Processes:
    """Child processes a test started the way a user does; all stopped at teardown."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.children: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "wb")
        child = subprocess.Popen(
            [sys.executable, "-m", *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Factory for real child processes, stopped after the test."""
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `check` until it is true, failing the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_ok(url: str) -> bool:
    """The URL answers 200."""
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def poll_job(base: str, job_id: str, timeout: float = 120.0) -> dict:
    """Poll a job until it reaches a terminal status; its last view."""
    view: dict = {}

    def done() -> bool:
        nonlocal view
        view = requests.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()
        return view["status"] in ("finished", "failed", "rejected")

    wait_for(done, timeout, f"job {job_id} to end", interval=0.2)
    return view


# --- a stack of real processes, for the OpenAI endpoints and cancellation ------------------------


@dataclass(frozen=True)
class Stack:
    """A running API, scheduler and gpu-single worker, and an API key of tenant `acme`."""

    base: str
    key: str
    redis: Redis
    logs: Path

    def client(self, **options: object) -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=self.key, max_retries=0, **options)  # type: ignore[arg-type]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def start_stack(
    redis_url: str, cache_dir: Path, folder: Path, model: str, **env: object
) -> tuple[Stack, Processes]:
    """API, scheduler and one gpu-single worker serving `model`, started the way a user does."""
    redis = Redis.from_url(redis_url)
    redis.flushall()
    key, _ = create_key(redis, "acme")
    procs = Processes(folder)
    port = free_port()
    config = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=cache_dir, GPTOSS_API_PORT=port, GPTOSS_MODEL=model,
        GPTOSS_AUTH="true", GPTOSS_HEARTBEAT_INTERVAL=0.5, **env,
    )  # fmt: skip
    procs.start("api", ["api"], config)
    procs.start("scheduler", ["scheduler"], config)
    procs.start("worker", ["workers"], {**config, "GPTOSS_WORKER_QUEUE": keys.SINGLE_QUEUE})

    def ready() -> bool:
        beats = read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
        try:
            up = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            up = False
        return up and any(b.state == "idle" for b in beats)

    try:
        wait_for(ready, 120, "the API and a loaded worker")
    except AssertionError:
        procs.stop_all()
        raise
    return Stack(f"http://127.0.0.1:{port}", key, redis, folder), procs


# --- what the Prometheus rules and the Grafana dashboard read -------------------------------------

RULES = sorted((ROOT / "compose" / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "gptoss.json"


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def used_metric_names() -> set[str]:
    """Every gptoss_ metric name that the rules and the dashboard read (recorded names excluded)."""
    text = " ".join(f.read_text() for f in RULES) + " ".join(dashboard_exprs())
    return set(re.findall(r"\b(gptoss_[a-z_]+)\b", text))


# --- the pipeline in one test process: API app, scheduler, burst workers on tiny gpt-oss ----------

TINY = "tiny-gpt-oss"
"""The trained tiny gpt-oss (harmony), fast enough for the in-process pipeline tests."""

InProcessStack = tuple[Settings, Any, Any]
"""Settings, an API test client and a Scheduler, over the test's Redis."""


@pytest.fixture(scope="session")
def runtime(prepared_models: Settings) -> Any:
    """tiny-gpt-oss loaded once for the session (a workers.runtime.ModelRuntime)."""
    from shared.registry import model_spec
    from workers.runtime import ModelRuntime

    return ModelRuntime.load(model_spec(TINY), prepared_models)


def live_test_workers(redis: Redis) -> None:
    """Heartbeats of one worker per queue, so the scheduler places jobs the burst workers run later."""
    for queue in keys.WORKER_QUEUES:
        beat = WorkerBeat(name=f"test-{queue}", queue=queue, model=TINY, device="cpu", state="idle",
                          pid=os.getpid(), host="test", at=time.time())  # fmt: skip
        publish(redis, keys.worker_heartbeat(beat.name), beat, 600)


@pytest.fixture
def streaming_stack(redis: Redis, settings: Callable[..., Settings], runtime: Any) -> InProcessStack:
    """The API and the scheduler of tiny-gpt-oss without telemetry, workers announced live."""
    from api import create_app
    from scheduler.loop import Scheduler
    from scheduler.tokens import PromptCounter

    config = settings(model=TINY, observability=False)
    app = create_app(config, redis).test_client()
    live_test_workers(redis)
    return config, app, Scheduler(config, redis, PromptCounter(config.cache_dir, config.vocab_dir()))


def schedule_all(scheduler: Any, redis: Redis) -> int:
    """Let `scheduler` take and place every job waiting on `incoming`; how many it took."""
    from shared.jobstore.intake import Intake

    intake, count = Intake(redis), 0
    while (job := intake.take(0.1)) is not None:
        scheduler.schedule(job)
        count += 1
    return count


def work(config: Settings, redis: Redis, runtime: Any, queue: str) -> Any:
    """A worker of `queue` on `runtime`, in this process, in burst mode: it runs what waits, then returns."""
    from workers import context
    from workers.worker import build_worker

    worker_config = config.model_copy(update={"worker_queue": queue})
    worker, _ = build_worker(worker_config, redis, runtime.device)
    context.bind(runtime, worker.name, queue)
    worker.activity = "idle"
    worker.work(burst=True, logging_level=None)
    return worker


# --- the batch engine's inputs ------------------------------------------------------------------------

QUESTIONS = ["a cat", "the sea", "a robot", "winter", "bread", "a king", "music", "the moon"]
"""Topics of the batch tests' requests."""


def sentence_request(topic: str, max_tokens: int = 8, **extra: object) -> Any:
    """A greedy chat request (a JobRequest) for one sentence about `topic`."""
    from shared.contract import JobRequest

    messages = [{"role": "user", "content": f"Write one sentence about {topic}."}]
    return JobRequest.model_validate(
        {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    )


def run_batch(
    runtime: Any, requests: list[Any], stagger: int = 0, prefill_chunk: int = 0
) -> list[tuple[int, ...]]:
    """Decode `requests` in one batch (the second half joining `stagger` steps late, prompts over
    `prefill_chunk` tokens prefilled a chunk per step); their tokens."""
    from workers.batch import Row
    from workers.sampling import sampler_for

    batch = runtime.new_batch(prefill_chunk)
    rows = [Row(str(i), runtime.completion(r), sampler_for(r, "cpu")) for i, r in enumerate(requests)]
    late = len(rows) // 2 if stagger else len(rows)
    batch.join(rows[:late])
    done: dict[str, tuple[int, ...]] = {}
    steps = 0
    while len(batch) or late < len(rows):
        if late < len(rows) and steps >= stagger:
            batch.join(rows[late:])
            late = len(rows)
        ended = {r.key for r in batch.rows if r.completion.ended}
        for row in batch.drop(ended):
            done[row.key] = tuple(row.completion.token_ids)
        batch.step()
        steps += 1
    return [done[str(i)] for i in range(len(requests))]
