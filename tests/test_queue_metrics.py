"""The API's queue gauges count every queue a kind of worker serves: the priority queues under their
names, and the workers' own queues summed per base (`own:gpu-single`), which is what the recording
rule that KEDA and the dashboard read adds up (compose/prometheus/rules/recording.yml)."""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, generate_latest
from redis import Redis

from api.metrics import RedisStateCollector, own_queues_by_label
from shared import keys
from shared.heartbeat import WorkerBeat, publish
from shared.jobstore.rqstore import open_queue


def beat(name: str, queue: str) -> WorkerBeat:
    return WorkerBeat(
        name=name, queue=queue, model="tiny-gpt-oss", device="cpu", state="idle", pid=os.getpid(),
        host="test", at=time.time(),
    )  # fmt: skip


def test_own_queues_are_grouped_by_their_live_workers_base() -> None:
    own = [keys.own_queue(n) for n in ("a", "b", "c", "gone")]
    workers = [beat("a", keys.SINGLE_QUEUE), beat("b", keys.MULTI_QUEUE), beat("c", keys.SINGLE_QUEUE)]
    assert own_queues_by_label(own, workers) == {
        "own:gpu-single": [keys.own_queue("a"), keys.own_queue("c")],
        "own:gpu-multi": [keys.own_queue("b")],
        "own": [keys.own_queue("gone")],  # its worker's heartbeat expired: the reaper moves its jobs
    }


def test_every_queue_of_a_base_is_reported(redis: Redis) -> None:
    for name, queue in (("w1", keys.SINGLE_QUEUE), ("w2", keys.MULTI_QUEUE)):
        publish(redis, keys.worker_heartbeat(name), beat(name, queue), 60)
    waiting = {keys.SINGLE_QUEUE: 1, "gpu-single:high": 3, "gpu-single:low": 2, keys.own_queue("w1"): 4,
               keys.own_queue("w2"): 5}  # fmt: skip
    for name, count in waiting.items():
        queue = open_queue(name, redis)
        for _ in range(count):
            queue.enqueue(keys.GENERATE_FUNC, {"prompt": "hi"})
    registry = CollectorRegistry()
    registry.register(RedisStateCollector(redis))
    text = generate_latest(registry).decode()
    reported = {("gpu-single", 1), ("gpu-single:high", 3), ("gpu-single:low", 2), ("own:gpu-single", 4),
                ("own:gpu-multi", 5), ("own", 0)}  # fmt: skip
    for queue, count in reported:
        assert f'gptoss_requests_waiting{{queue="{queue}"}} {count:.1f}' in text, queue
    assert "worker:w1" not in text  # no series per worker process
