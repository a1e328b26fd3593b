"""The pipeline across hosts: Redis with Sentinel, two APIs, the scheduler and a worker each in a
network namespace of its own (tests/hosts.py), talking only over the private network. A user's
request goes in through API 1, is polled through API 2 and is run by the worker on its own host."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench.sentinel_cluster import SentinelCluster
from shared import keys
from shared.connection import connect
from shared.heartbeat import WorkerBeat, read_live
from shared.settings import Settings
from tests.conftest import ROOT, Processes, process_env, wait_for
from tests.hosts import Network, namespaces_work

API_PORT = 8000


@pytest.fixture
def network() -> Iterator[Network]:
    if (why := namespaces_work()) is not None:
        pytest.skip(why)
    net = Network().open()
    yield net
    net.close()


class Hosts(Processes):
    """Processes started on the namespaces' hosts (each under `ip netns exec`); all stopped at teardown."""

    def __init__(self, network: Network, logs: Path):
        super().__init__(logs)
        self.network = network

    def start_on(self, address: str, name: str, module: str, env: dict[str, str]) -> None:
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115
        argv = [*self.network.prefix(address), sys.executable, "-m", module]
        self.children.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_request_goes_in_through_one_api_out_through_another_run_on_a_third_host(
    network: Network, prepared_models: Settings, tmp_path: Path
) -> None:
    redis_host = network.add("redis")
    api1, api2 = network.add("api1"), network.add("api2")
    scheduler_host, worker_host = network.add("sched"), network.add("worker")
    on_redis_host = network.prefix(redis_host)
    cluster = SentinelCluster(tmp_path / "redis", hosts=[redis_host] * 6, prefixes=[on_redis_host] * 6)
    hosts = Hosts(network, tmp_path)
    try:
        cluster.start()
        env = process_env(
            GPTOSS_REDIS_SENTINELS=cluster.sentinel_list, GPTOSS_REDIS_WAIT_REPLICAS=1,
            GPTOSS_MODEL="smollm2-135m", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
            GPTOSS_HEARTBEAT_INTERVAL=0.5, GPTOSS_API_PORT=API_PORT,
        )  # fmt: skip
        hosts.start_on(api1, "api1", "api", {**env, "GPTOSS_API_HOST": api1})
        hosts.start_on(api2, "api2", "api", {**env, "GPTOSS_API_HOST": api2})
        hosts.start_on(scheduler_host, "scheduler", "scheduler", env)
        hosts.start_on(worker_host, "worker", "workers", {**env, "GPTOSS_WORKER_QUEUE": keys.SINGLE_QUEUE})
        redis = connect(cluster.url)
        first, second = f"http://{api1}:{API_PORT}", f"http://{api2}:{API_PORT}"

        def ready() -> bool:
            beats = read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
            return _healthy(first) and _healthy(second) and any(b.state == "idle" for b in beats)

        wait_for(ready, 180, "both APIs and a loaded worker on their own hosts")
        body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}
        accepted = requests.post(f"{first}/v1/jobs", json=body, timeout=30)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]

        view: dict = {}

        def ended() -> bool:
            nonlocal view
            view = requests.get(f"{second}/v1/jobs/{job_id}", timeout=10).json()
            return view["status"] in ("finished", "failed", "rejected")

        wait_for(ended, 120, "the job to end, polled through the second API", interval=0.2)
        assert view["status"] == "finished", view
        assert view["result"]["usage"]["completion_tokens"] >= 1

        # Each process reached Redis from its own host's address; the worker ran the job.
        addresses = {line["addr"].rsplit(":", 1)[0] for line in redis.client_list()}
        assert {api1, api2, scheduler_host, worker_host} <= addresses
        worker_name = next(b.name for b in read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat))
        ran_by = view.get("route", {}).get("worker") or view.get("worker")
        assert ran_by in (None, worker_name)  # named when the view carries it
    finally:
        hosts.stop_all()
        cluster.stop()
