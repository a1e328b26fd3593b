"""Memory pressure and holds with real processes: workers whose memory readings come from files
the test writes (GPTOSS_MEMORY_READING_FILE), a real scheduler and API on the test Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore.rqstore import open_queue
from tests.conftest import Processes, http_ok, poll_job, process_env, wait_for

ADMIN_KEY = "pressure-admin"
GIB = 1 << 30


@dataclass(frozen=True)
class Cluster:
    base: str
    memory: dict[str, Path]
    redis: Redis

    def press(self, queue: str, pressure: float) -> None:
        """Make the worker of `queue` report `pressure`, and wait until the scheduler can see it."""
        self.memory[queue].write_text(json.dumps({"used": int(pressure * 10 * GIB), "total": 10 * GIB}))

        def seen() -> bool:
            workers = self.capacity()["workers"]
            return any(w["queue"] == queue and abs(w["pressure"] - pressure) < 1e-6 for w in workers)

        wait_for(seen, 10, f"{queue} to report {pressure}")

    def capacity(self) -> dict:
        answer = requests.get(
            f"{self.base}/admin/capacity", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5
        )
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def cluster(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("pressure")
    redis = Redis.from_url(redis_url)
    redis.flushall()
    procs = Processes(folder)
    port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
        GPTOSS_ADMIN_KEY=ADMIN_KEY, GPTOSS_HEARTBEAT_INTERVAL=0.25, GPTOSS_HEARTBEAT_TTL=3,
        GPTOSS_MULTI_GPU_THRESHOLD=300, GPTOSS_LONG_PROMPT_TOKENS=60, GPTOSS_HOLD_TIMEOUT=300,
    )  # fmt: skip
    memory = {q: folder / f"{q}.json" for q in keys.WORKER_QUEUES}
    for path in memory.values():
        path.write_text(json.dumps({"used": GIB, "total": 10 * GIB}))
    procs.start("api", ["api"], env)
    procs.start("scheduler", ["scheduler"], env)
    for queue, path in memory.items():
        procs.start(
            queue, ["workers"], {**env, "GPTOSS_WORKER_QUEUE": queue, "GPTOSS_MEMORY_READING_FILE": str(path)}
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{base}/readyz"), 120, "the stack to be ready")
        yield Cluster(base, memory, redis)
    finally:
        procs.stop_all()


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    for queue in keys.WORKER_QUEUES:
        cluster.press(queue, 0.1)
    return cluster


def submit(base: str, words: int) -> str:
    content = "Reply with one word. " + "Context sentence here. " * words
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0}
    answer = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def view(base: str, job_id: str) -> dict:
    return requests.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()


def test_routing_follows_pressure(healthy: Cluster) -> None:
    short, medium, large = 1, 15, 80  # ~30, ~90 and ~430 prompt tokens
    healthy.press(keys.SINGLE_QUEUE, 0.90)  # warn: gpu-single takes short prompts, no long ones
    views = {name: poll_job(healthy.base, submit(healthy.base, n), 60) for name, n in
             (("short", short), ("medium", medium), ("large", large))}  # fmt: skip
    assert views["short"]["route"]["queue"] == "gpu-single"
    assert views["medium"]["route"] | {} == {
        **views["medium"]["route"],
        "queue": "gpu-multi",
        "reason": "pressure_spill",
    }
    assert views["medium"]["result"]["queue"] == "gpu-multi"
    assert (
        views["large"]["route"]["queue"] == "gpu-multi"
        and views["large"]["route"]["reason"] == "over_threshold"
    )
    assert all(v["status"] == "finished" for v in views.values())
    assert healthy.redis.zcard(keys.tenant_backlog(keys.DEFAULT_TENANT)) == 0  # started jobs left it


def test_critical_holds_and_resumes_when_pressure_drops(healthy: Cluster) -> None:
    healthy.press(keys.SINGLE_QUEUE, 0.97)
    healthy.press(keys.MULTI_QUEUE, 0.97)
    held_id = submit(healthy.base, 1)
    wait_for(lambda: view(healthy.base, held_id)["status"] == "held", 10, "the job to be held")
    held = view(healthy.base, held_id)
    assert held["held"]["code"] == "memory_critical" and "critical" in held["held"]["message"]
    capacity = healthy.capacity()
    assert [h["id"] for h in capacity["held"]] == [held_id]
    assert {w["level"] for w in capacity["workers"]} == {"critical"}

    # A critical worker takes nothing new, even a job put straight onto its queue.
    worker_log = healthy.memory[keys.SINGLE_QUEUE].parent / f"{keys.SINGLE_QUEUE}.log"
    wait_for(lambda: "memory_critical_paused" in worker_log.read_text(), 10, "the idle worker to pause")
    direct = open_queue(keys.SINGLE_QUEUE, healthy.redis).enqueue(
        keys.GENERATE_FUNC,
        {"prompt": "Hi", "max_tokens": 2, "temperature": 0},
        result_ttl=300,
        failure_ttl=300,
    )
    enqueued = time.time()

    def beat_since(seconds: float) -> bool:
        beats = read_live(healthy.redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
        return any(b.queue == keys.SINGLE_QUEUE and b.at > enqueued + seconds for b in beats)

    # The worker stays alive and beating (paused) for two seconds after the job arrived.
    wait_for(lambda: beat_since(2.0), 10, "two seconds of heartbeats from the paused worker")
    assert direct.get_status(refresh=True) == "queued"
    assert view(healthy.base, held_id)["status"] == "held"

    healthy.press(keys.SINGLE_QUEUE, 0.2)  # below warn: the worker resumes, the scheduler releases
    done = poll_job(healthy.base, held_id, 60)
    assert done["status"] == "finished" and done["route"]["queue"] == "gpu-single"
    assert "held" not in done
    wait_for(lambda: direct.get_status(refresh=True) == "finished", 30, "the direct job to run")
    decisions = [json.loads(d) for d in healthy.redis.lrange(keys.DECISIONS, 0, -1)]
    mine = [(d["outcome"], d["reason"]) for d in decisions if d["job_id"] == held_id]
    assert ("held", "memory_critical") in mine and ("gpu-single", "within_threshold") in mine
