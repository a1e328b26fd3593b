"""Bounded Redis memory: after a run that makes every kind of key, every key the project (or RQ
for it) wrote has a TTL, except a short list of queue structures and configuration, each bounded."""

from __future__ import annotations

import fnmatch
import time

import requests
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.apikeys import create_key
from shared.jobstore.rqstore import open_queue
from tests.conftest import Processes, http_ok, process_env, wait_for

WITHOUT_TTL = {
    # RQ's own queue structures: lists and registries whose entries leave as jobs move on.
    "rq:queue:*": "a queue: ids leave as workers take them",
    "rq:queues": "the set of queue names",
    "rq:workers": "the set of live worker keys (RQ prunes dead ones)",
    "rq:workers:*": "per-queue worker sets (RQ prunes dead ones)",
    "rq:wip:*": "started registries: entries leave when jobs end",
    "rq:finished:*": "finished registries: entries expire with their jobs (scored by expiry)",
    "rq:failed:*": "failed registries: entries expire with their jobs",
    "rq:canceled:*": "canceled registries: entries expire with their jobs",
    "rq:intermediate:*": "RQ's intermediate queue: ids leave once a job is prepared",
    "rq:executions:*": "a job's executions: emptied as they end",
    # Ours: queue structures and configuration, each bounded by something else.
    keys.SCHEDULER_INFLIGHT: "at most one id per scheduler",
    keys.SCHEDULER_HELD: "held jobs, bounded by the backlog budget",
    keys.RUNNING: "one entry per running job",
    keys.API_KEYS: "configuration: one entry per key an operator made",
    keys.API_KEY_IDS: "configuration: one entry per key an operator made",
}


def test_every_key_has_a_ttl_or_a_reason(
    redis: Redis, redis_url: str, prepared_models, processes: Processes
) -> None:
    api_port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_MODEL="tiny-gpt-oss",
        GPTOSS_API_PORT=api_port, GPTOSS_AUTH="true", GPTOSS_HOLD_TIMEOUT=1, GPTOSS_ADMIN_KEY="adm",
        GPTOSS_HEARTBEAT_INTERVAL=0.25, GPTOSS_HEARTBEAT_TTL=2,
    )  # fmt: skip
    base = f"http://127.0.0.1:{api_port}"
    key, _ = create_key(redis, "acme")
    auth = {"Authorization": f"Bearer {key}"}
    processes.start("api", ["api"], env)
    processes.start("scheduler", ["scheduler"], env)
    wait_for(lambda: http_ok(f"{base}/healthz"), 30, "the API")

    # Held then expired: no worker lives yet.
    expired = requests.post(
        f"{base}/v1/jobs", json={"prompt": "a", "max_tokens": 2}, headers=auth, timeout=10
    )
    expired_url = f"{base}/v1/jobs/{expired.json()['id']}"
    wait_for(lambda: requests.get(expired_url, headers=auth, timeout=5).json()["status"] == "rejected", 30,
             "the held job to expire")  # fmt: skip
    for queue in ("gpu-single", "gpu-multi"):
        processes.start(queue, ["workers"], {**env, "GPTOSS_WORKER_QUEUE": queue})
    wait_for(lambda: http_ok(f"{base}/readyz"), 60, "readiness")
    finished = requests.post(
        f"{base}/v1/jobs", json={"prompt": "Hi", "max_tokens": 3}, headers=auth, timeout=10
    )
    failing = open_queue(keys.SINGLE_QUEUE, redis).enqueue(
        keys.GENERATE_FUNC, {"prompt": "x", "temperature": 9}, failure_ttl=keys.FAILURE_TTL
    )
    stream = requests.get(f"{base}/v1/jobs/{finished.json()['id']}/events", headers=auth, timeout=60)
    assert "event: done" in stream.text
    wait_for(lambda: failing.get_status(refresh=True) == "failed", 30, "the bad job to fail")
    requests.get(f"{base}/admin/debug-bundle", headers={"Authorization": "Bearer adm"}, timeout=30)
    time.sleep(0.5)

    names = [raw.decode() for raw in redis.scan_iter(count=1000)]
    for kind in ("gptoss:stream:*", keys.DECISIONS, keys.DRAINED, "gptoss:ratelimit*", "gptoss:heartbeat:*",
                 "rq:job:*", "rq:results:*", "rq:worker:*"):  # fmt: skip
        assert any(fnmatch.fnmatchcase(n, kind) for n in names), f"the run made no {kind} key"
    unbounded = []
    for name in names:
        if redis.ttl(name) >= 0 or redis.type(name) == b"none":
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in WITHOUT_TTL):
            unbounded.append((name, redis.type(name).decode()))
    assert not unbounded, f"keys without a TTL and without a reason: {unbounded}"
