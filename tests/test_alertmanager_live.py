"""Alerts reach someone: a real Prometheus evaluating the committed rules on a live stack, a real
Alertmanager (Debian's prometheus-alertmanager) on the committed routes, and a webhook receiver of
the test's own. A fault is injected (the worker's memory reads 96%); the critical and the warning
alert each arrive at their severity's receiver with the cluster's labels, and resolve when the
memory is back. The rules run with `for: 1s` and a 1 s evaluation (the real durations are pinned
by the promtool tests)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from cli.up import free_port
from shared import keys
from tests.conftest import Processes, http_ok, process_env, wait_for
from tests.monitoring import (
    Receiver,
    alertmanager,
    cluster_config,
    fast_rules,
    prometheus,
    webhook_receiver,
)

GIB = 1 << 30
CLUSTER = {"GPTOSS_CLUSTER": "eu-test-1", "GPTOSS_REGION": "eu-test"}


@dataclass(frozen=True)
class Stack:
    targets: dict[str, list[str]]
    memory: Path  # the worker's memory reading (GPTOSS_MEMORY_READING_FILE)

    def press(self, share: float) -> None:
        """Make the worker's device memory read `share` used."""
        self.memory.write_text(json.dumps({"used": int(share * 10 * GIB), "total": 10 * GIB}))


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API, scheduler and a gpu-single worker on tiny-gpt-oss whose memory reading the test sets."""
    folder = tmp_path_factory.mktemp("alerting")
    Redis.from_url(redis_url).flushall()
    procs = Processes(folder)
    port, scheduler_port, worker_port = free_port(), free_port(), free_port()
    memory = folder / "memory.json"
    stack = Stack(
        {"gptoss-api": [f"127.0.0.1:{port}"], "gptoss-scheduler": [f"127.0.0.1:{scheduler_port}"],
         "gptoss-worker": [f"127.0.0.1:{worker_port}"]},
        memory,
    )  # fmt: skip
    stack.press(0.5)
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_API_PORT=port, GPTOSS_SCHEDULER_METRICS_PORT=scheduler_port, GPTOSS_HEARTBEAT_INTERVAL=0.5,
        **CLUSTER,
    )  # fmt: skip
    procs.start("api", ["api"], env)
    procs.start("scheduler", ["scheduler"], env)
    procs.start(
        "worker",
        ["workers"],
        {**env, "GPTOSS_WORKER_QUEUE": keys.SINGLE_QUEUE, "GPTOSS_WORKER_METRICS_PORT": str(worker_port),
         "GPTOSS_MEMORY_READING_FILE": str(memory)},
    )  # fmt: skip
    dead = lambda: any(child.poll() is not None for child in procs.children)  # noqa: E731
    try:
        for hosts in stack.targets.values():
            wait_for(
                lambda h=hosts[0]: http_ok(f"http://{h}/metrics") or dead(), 120, f"{hosts[0]} to answer"
            )
        assert not dead(), "\n".join(f"== {f.name}\n{f.read_text()[-1500:]}" for f in folder.glob("*.log"))
        yield stack
    finally:
        procs.stop_all()


def delivered(receiver: Receiver, path: str, alertname: str, status: str) -> list[dict[str, Any]]:
    return [
        a for a in receiver.alerts(path) if a["labels"]["alertname"] == alertname and a["status"] == status
    ]


def test_a_memory_fault_reaches_the_receiver_of_each_severity(stack: Stack, tmp_path: Path) -> None:
    with webhook_receiver() as receiver, alertmanager(tmp_path / "alertmanager", receiver) as manager:
        target = manager.url.removeprefix("http://")
        config = cluster_config(stack.targets, fast_rules(tmp_path / "rules", hold="1s"), alertmanager=target)
        with prometheus(tmp_path / "prometheus", config, env=CLUSTER) as server:
            wait_for(lambda: bool(server.query("gptoss_memory_pressure == 0.5")), 30, "the healthy reading")
            assert not server.query('ALERTS{alertname=~"GptossMemoryPressure.*"}')

            stack.press(0.96)
            for path, name in (
                ("/critical", "GptossMemoryPressureCritical"),
                ("/warning", "GptossMemoryPressureHigh"),
            ):
                wait_for(
                    lambda p=path, n=name: bool(delivered(receiver, p, n, "firing")), 60, f"{name} at {path}"
                )
                (alert, *_) = delivered(receiver, path, name, "firing")
                labels = alert["labels"]
                assert labels["severity"] == path.strip("/")
                assert (labels["cluster"], labels["region"]) == (
                    CLUSTER["GPTOSS_CLUSTER"],
                    CLUSTER["GPTOSS_REGION"],
                )
                assert (
                    labels["job"] == "gptoss-worker"
                    and labels["instance"] == stack.targets["gptoss-worker"][0]
                )
                assert alert["annotations"]["summary"].endswith("memory at 96%")
            # Each notification went to its own receiver only.
            assert not delivered(receiver, "/warning", "GptossMemoryPressureCritical", "firing")
            assert not delivered(receiver, "/critical", "GptossMemoryPressureHigh", "firing")

            stack.press(0.5)
            resolved = lambda: delivered(receiver, "/critical", "GptossMemoryPressureCritical", "resolved")  # noqa: E731
            wait_for(lambda: bool(resolved()), 60, "the critical alert to resolve")
