"""No lost jobs: a worker killed mid-job, a worker stopped (gracefully or past its grace), a
scheduler stopped with work in flight. Real processes, the embedded SmolLM2, the test Redis."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import requests
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.jobstore.rqstore import fetch_job
from tests.conftest import Processes, http_ok, poll_job, process_env, wait_for

LONG = {
    "messages": [{"role": "user", "content": "Write the numbers from 1 to 300, separated by commas."}],
    "max_tokens": 160,
    "temperature": 0,
}


@pytest.fixture
def stack(redis: Redis, redis_url: str, prepared_models, processes: Processes):  # type: ignore[no-untyped-def]
    """API and scheduler up; returns (base URL, a function that starts a gpu-single worker)."""
    port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
        GPTOSS_HEARTBEAT_INTERVAL=0.25, GPTOSS_HEARTBEAT_TTL=2, GPTOSS_HOLD_TIMEOUT=120,
    )  # fmt: skip
    processes.start("api", ["api"], env)
    processes.start("scheduler", ["scheduler"], env)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_ok(f"{base}/healthz"), 30, "the API")
    count = iter(range(100))

    def start_worker(**extra: object) -> subprocess.Popen:
        worker_env = {**env, "GPTOSS_WORKER_QUEUE": "gpu-single", **{k: str(v) for k, v in extra.items()}}
        child = processes.start(f"worker-{next(count)}", ["workers"], worker_env)
        wait_for(lambda: _live_workers(redis) >= 1, 60, "a live gpu-single worker")
        return child

    return base, start_worker


def _live_workers(redis: Redis) -> int:
    found = list(redis.scan_iter(match=keys.WORKER_HEARTBEAT_PATTERN))
    beats = [json.loads(raw) for raw in redis.mget(found)] if found else []
    return sum(1 for beat in beats if beat and beat["state"] != "loading")


def submit_and_wait_started(base: str, redis: Redis) -> str:
    job_id = requests.post(f"{base}/v1/jobs", json=LONG, timeout=10).json()["id"]
    wait_for(
        lambda: fetch_job(job_id, redis).meta.get("timestamps", {}).get("first_token"), 60, "tokens to flow"
    )
    return job_id


def stream_events(redis: Redis, job_id: str) -> list[str]:
    return [fields[b"event"].decode() for _, fields in redis.xrange(keys.job_stream(job_id))]


def results_of(redis: Redis, job_id: str) -> int:
    return len(redis.xrange(f"rq:results:{job_id}"))


def test_killed_worker_is_detected_and_its_job_retried_once(stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    base, start_worker = stack
    first = start_worker()
    job_id = submit_and_wait_started(base, redis)
    first.send_signal(signal.SIGKILL)
    start_worker()  # a replacement
    view = poll_job(base, job_id, 120)
    assert view["status"] == "finished", view
    job = fetch_job(job_id, redis)
    assert job.meta["retries"] == 1
    assert results_of(redis, job_id) == 1  # delivered once
    events = stream_events(redis, job_id)
    assert "retry" in events and events.count("done") == 1
    assert events.index("retry") < len(events) - 1 - events[::-1].index("start")  # a fresh start after it
    assert redis.hlen(keys.RUNNING) == 0
    assert redis.zcard("rq:wip:gpu-single") == 0


def test_a_job_whose_workers_keep_dying_fails_with_a_reason(
    stack, redis: Redis, redis_url: str, processes
) -> None:  # type: ignore[no-untyped-def]
    base, start_worker = stack
    # A scheduler that allows no retry: the first loss fails the job.
    for child in processes.children[1:2]:
        child.send_signal(signal.SIGTERM)
        child.wait(30)
    env = process_env(GPTOSS_REDIS_URL=redis_url, GPTOSS_JOB_MAX_RETRIES=0, GPTOSS_HEARTBEAT_TTL=2)
    processes.start("scheduler-strict", ["scheduler"], env)
    worker = start_worker()
    job_id = submit_and_wait_started(base, redis)
    worker.send_signal(signal.SIGKILL)
    view = poll_job(base, job_id, 60)
    assert view["status"] == "failed" and view["error"]["code"] == "worker_lost"
    assert "lost 1 times" in view["error"]["message"]
    assert "error" in stream_events(redis, job_id)


def test_sigterm_lets_the_running_job_finish(stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    base, start_worker = stack
    worker = start_worker(GPTOSS_SHUTDOWN_GRACE=120)
    job_id = submit_and_wait_started(base, redis)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(120) == 0
    view = poll_job(base, job_id, 10)
    assert view["status"] == "finished" and fetch_job(job_id, redis).meta.get("retries", 0) == 0


def test_past_the_grace_the_job_is_handed_back_not_failed(stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    base, start_worker = stack
    worker = start_worker(GPTOSS_SHUTDOWN_GRACE=0.5)
    job_id = submit_and_wait_started(base, redis)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert fetch_job(job_id, redis).get_status(refresh=True) == "queued"
    assert fetch_job(job_id, redis).meta["retries"] == 0  # a shutdown is not the job's failure
    assert "retry" in stream_events(redis, job_id)
    start_worker()
    assert poll_job(base, job_id, 120)["status"] == "finished"
    assert results_of(redis, job_id) == 1


def test_scheduler_restart_loses_nothing(stack, redis: Redis, redis_url: str, processes) -> None:  # type: ignore[no-untyped-def]
    base, start_worker = stack
    scheduler = processes.children[1]
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait(30) == 0
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    ids = [requests.post(f"{base}/v1/jobs", json=body, timeout=10).json()["id"] for _ in range(5)]
    processes.start("scheduler-2", ["scheduler"], process_env(GPTOSS_REDIS_URL=redis_url))
    start_worker()
    assert [poll_job(base, job_id, 120)["status"] for job_id in ids] == ["finished"] * 5


def test_reaper_waits_for_heartbeats_to_settle_before_handing_back(redis: Redis) -> None:
    """Right after it starts (or after an outage) the reaper trusts no missing heartbeat: a live
    worker may simply not have beaten yet, and handing its job back would run it twice."""
    from scheduler.reaper import Reaper
    from shared.jobstore.ledger import mark_running
    from shared.jobstore.rqstore import open_queue

    job = open_queue(keys.SINGLE_QUEUE, redis).enqueue(keys.GENERATE_FUNC, {"prompt": "x"}, failure_ttl=60)
    open_queue(keys.SINGLE_QUEUE, redis).remove(job)
    mark_running(redis, job.id, "a-worker-without-heartbeat", keys.SINGLE_QUEUE)
    clock = [100.0]
    reaper = Reaper(redis, max_retries=2, settle=1.0, clock=lambda: clock[0])
    assert reaper.sweep() == {}  # not settled yet
    assert redis.hexists(keys.RUNNING, job.id)
    clock[0] += 1.1
    wait_for(lambda: int(redis.info("server")["uptime_in_seconds"]) >= 1, 5, "Redis to be up a second")
    assert reaper.sweep() == {job.id: "requeued"}
    assert open_queue(keys.SINGLE_QUEUE, redis).job_ids == [job.id]
