"""The error-budget alerts against real processes: a real Prometheus (Debian's) runs the committed
rules with the SLO windows scaled down 60 times (an hour is a minute), scrapes a stack on
tiny-gpt-oss that serves a chosen mix of good and poison jobs, and the fast-burn alert pages for
the model's job errors; on good traffic alone the burn rate is 0 and nothing pages."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from redis import Redis

from cli.up import free_port
from shared import keys, slo_rules
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore.rqstore import open_queue
from tests.conftest import Processes, http_ok, poll_job, process_env, wait_for
from tests.monitoring import Server, cluster_config, fast_rules, prometheus

SCALE = 60
"""Every SLO window divided by this: the fast-burn alert's 1h and 5m windows are 60 s and 5 s."""

POISON_EVERY = 4
"""One job in this many fails (a temperature no request could ask for, put past the API's
validation): 25% of the jobs, 250 times the 0.1% budget."""

MODEL = "tiny-gpt-oss"


@dataclass(frozen=True)
class Stack:
    base: str
    targets: dict[str, list[str]]
    redis_url: str


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API, scheduler and a gpu-single worker on tiny-gpt-oss, each /metrics on its own port."""
    folder = tmp_path_factory.mktemp("slo-live")
    Redis.from_url(redis_url).flushall()
    procs = Processes(folder)
    port, scheduler_port, worker_port = free_port(), free_port(), free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_MODEL=MODEL, GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_API_PORT=port, GPTOSS_SCHEDULER_METRICS_PORT=scheduler_port,
        GPTOSS_WORKER_METRICS_PORT=worker_port, GPTOSS_HEARTBEAT_INTERVAL=0.5,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        procs.start("api", ["api"], env)
        procs.start("scheduler", ["scheduler"], env)
        procs.start("worker", ["workers"], {**env, "GPTOSS_WORKER_QUEUE": keys.SINGLE_QUEUE})
        dead = lambda: any(child.poll() is not None for child in procs.children)  # noqa: E731
        redis = Redis.from_url(redis_url)

        def ready() -> bool:  # /readyz also wants a gpu-multi worker, which this stack does not run
            idle = any(b.state == "idle" for b in read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat))
            return (idle and http_ok(f"{base}/healthz")) or dead()

        wait_for(ready, 120, "the API and a loaded worker")
        assert not dead(), "\n".join(f.read_text()[-1500:] for f in folder.glob("*.log"))
        targets = {
            "gptoss-api": [f"127.0.0.1:{port}"],
            "gptoss-scheduler": [f"127.0.0.1:{scheduler_port}"],
            "gptoss-worker": [f"127.0.0.1:{worker_port}"],
        }
        yield Stack(base, targets, redis_url)
    finally:
        procs.stop_all()


def good_job(stack: Stack) -> None:
    job = requests.post(f"{stack.base}/v1/jobs", json={"prompt": "Hello", "max_tokens": 4}, timeout=5).json()
    assert poll_job(stack.base, job["id"], 60)["status"] == "finished"


def poison_job(stack: Stack) -> None:
    """A job that fails in the worker, put on gpu-single past the API's validation."""
    failing = open_queue(keys.SINGLE_QUEUE, Redis.from_url(stack.redis_url)).enqueue(
        keys.GENERATE_FUNC, {"prompt": "x", "temperature": 99}, failure_ttl=300
    )
    wait_for(lambda: failing.get_status(refresh=True) == "failed", 30, "the poison job to fail")


def paging(server: Server, alert: str) -> list[dict[str, str]]:
    """The labels of every firing `alert` (Prometheus's /api/v1/alerts)."""
    body = requests.get(f"{server.url}/api/v1/alerts", timeout=5).json()
    return [
        a["labels"]
        for a in body["data"]["alerts"]
        if a["labels"]["alertname"] == alert and a["state"] == "firing"
    ]


def test_fast_burn_pages_when_jobs_fail_at_a_chosen_rate(stack: Stack, tmp_path: Path) -> None:
    rules = fast_rules(tmp_path / "rules")
    (rules / slo_rules.RULES_FILE.name).write_text(slo_rules.render_rules(scale=SCALE))
    config = cluster_config(stack.targets, rules, alertmanager=None)
    with prometheus(tmp_path / "prometheus", config) as server:
        wait_for(
            lambda: len([r for r in server.query("up") if r["value"][1] == "1"]) == 3, 30, "every target up"
        )
        errors = f'gptoss:slo_burn_rate:rate1h{{slo="errors", model="{MODEL}"}}'
        # Good traffic alone: the errors burn at 0 (over the minute that stands for an hour), no page.
        for _ in range(3):
            good_job(stack)
        wait_for(lambda: any(r["value"][1] == "0" for r in server.query(errors)), 30, "the errors' burn rate")
        assert not [a for a in paging(server, "GptossErrorBudgetFastBurn") if a.get("slo") == "errors"]

        stop = threading.Event()
        failures: list[BaseException] = []

        def mix() -> None:
            try:
                while not stop.is_set():
                    for _ in range(POISON_EVERY - 1):
                        good_job(stack)
                    poison_job(stack)
            except BaseException as error:  # noqa: BLE001 (reported by the test below)
                failures.append(error)

        thread = threading.Thread(target=mix, daemon=True)
        thread.start()
        try:
            wanted = {
                "alertname": "GptossErrorBudgetFastBurn",
                "severity": "critical",
                "slo": "errors",
                "model": MODEL,
            }
            wait_for(lambda: any(wanted.items() <= a.items() for a in paging(server, wanted["alertname"]))
                     or bool(failures), 120, "the fast-burn page", interval=0.5)  # fmt: skip
            assert not failures, failures
            # Both of its windows burn far over 14.4x: a quarter of the jobs fail, the budget is 0.1%.
            for window in ("1h", "5m"):
                (burn,) = server.query(f'gptoss:slo_burn_rate:rate{window}{{slo="errors", model="{MODEL}"}}')
                assert float(burn["value"][1]) > 14.4
        finally:
            stop.set()
            thread.join(60)
