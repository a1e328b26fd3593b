"""A Redis outage: the API answers 503 with Retry-After (never 500), processes reconnect by
themselves, and jobs accepted before the outage survive it (AOF) and finish."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from redis import Redis
from redis.exceptions import RedisError

from cli.up import free_port
from shared import keys
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore.rqstore import fetch_job, open_queue
from tests.conftest import TINY, Processes, http_ok, poll_job, process_env, wait_for

BODY = {"prompt": "Hello", "max_tokens": 24, "temperature": 0}


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(folder), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = Redis(port=port)
    wait_for(lambda: _pings(client), 10, "redis-server")
    return server


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_redis_restart_loses_no_accepted_job(tmp_path: Path, prepared_models, processes: Processes) -> None:
    port, api_port = free_port(), free_port()
    server = start_redis(port, tmp_path)
    env = process_env(
        GPTOSS_REDIS_URL=f"redis://127.0.0.1:{port}/0", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_API_PORT=api_port, GPTOSS_HOLD_TIMEOUT=600,
        GPTOSS_HEARTBEAT_INTERVAL=0.25, GPTOSS_HEARTBEAT_TTL=2,
    )  # fmt: skip
    base = f"http://127.0.0.1:{api_port}"
    processes.start("api", ["api"], env)
    scheduler = processes.start("scheduler", ["scheduler"], env)
    wait_for(lambda: http_ok(f"{base}/healthz"), 30, "the API")
    workers = [
        processes.start(q, ["workers"], {**env, "GPTOSS_WORKER_QUEUE": q})
        for q in ("gpu-single", "gpu-multi")
    ]
    wait_for(lambda: http_ok(f"{base}/readyz"), 60, "readiness")
    accepted = [requests.post(f"{base}/v1/jobs", json=BODY, timeout=10).json()["id"] for _ in range(12)]

    server.terminate()  # SIGTERM: Redis flushes its AOF and exits
    server.wait(10)
    down = requests.post(f"{base}/v1/jobs", json=BODY, timeout=30)
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert down.json()["error"]["code"] == "service_unavailable"
    assert requests.get(f"{base}/v1/jobs/{accepted[0]}", timeout=30).status_code == 503
    assert requests.get(f"{base}/readyz", timeout=30).status_code == 503
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200

    server = start_redis(port, tmp_path)  # the same data: the AOF brings the queued jobs back
    try:
        wait_for(lambda: requests.post(f"{base}/v1/jobs", json=BODY, timeout=10).status_code == 202, 30,
                 "the API to accept jobs again")  # fmt: skip
        assert [poll_job(base, job_id, 120)["status"] for job_id in accepted] == ["finished"] * len(accepted)
        wait_for(lambda: http_ok(f"{base}/readyz"), 30, "readiness again")
        # Nobody had to restart anything: every process rode out the outage.
        assert scheduler.poll() is None and all(worker.poll() is None for worker in workers)
    finally:
        processes.stop_all()
        server.terminate()
        server.wait(10)


# --- a busy worker while its Redis crashes or stalls ------------------------------------------------

HEARTBEAT_TTL = 2
"""Seconds a heartbeat lives in these tests."""

STALL = HEARTBEAT_TTL + 2
"""Seconds Redis stays stopped in the stall test: longer than a heartbeat lives."""

JOBS = 12
"""Jobs queued at once; two at a time, they keep the worker busy through the fault."""

BUSY_BODY = {
    "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
    "max_tokens": 48,
    "temperature": 0,
}


class RedisServer:
    """A redis-server of the test's own whose data (AOF, each write synced) outlives a crash."""

    def __init__(self, folder: Path):
        self.port, self.folder = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = start_redis(self.port, folder)

    def restart(self) -> None:
        """Start it again on the same port and data."""
        self.process = start_redis(self.port, self.folder)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped server cannot act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis the test may crash, stall and restart (stopped after the test's processes)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def _worker_state(redis: Redis) -> str | None:
    try:
        beats = read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
    except RedisError:
        return None
    return beats[0].state if beats else None


def _logged(log: Path, event: str) -> bool:
    """Whether the process that writes `log` (JSON lines, among others) logged `event`."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("event") == event:
                return True
        except (ValueError, AttributeError):
            continue
    return False


def _all_ended(redis: Redis, ids: list[str]) -> bool:
    try:
        return all(fetch_job(job_id, redis).get_status() in ("finished", "failed") for job_id in ids)
    except RedisError:
        return False


@pytest.mark.parametrize("fault", ["crash", "stall"])
def test_a_busy_worker_survives_its_redis_crashing_or_stalling(
    fault: str, tmp_path: Path, prepared_models, own_redis: RedisServer, processes: Processes
) -> None:  # type: ignore[no-untyped-def]
    env = process_env(
        GPTOSS_REDIS_URL=own_redis.url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_MODEL=TINY,
        GPTOSS_WORKER_QUEUE=keys.SINGLE_QUEUE, GPTOSS_MAX_BATCH_SIZE=2, GPTOSS_HEARTBEAT_INTERVAL=0.25,
        GPTOSS_HEARTBEAT_TTL=HEARTBEAT_TTL,
    )  # fmt: skip
    redis = Redis.from_url(own_redis.url)
    processes.start("scheduler", ["scheduler"], env)  # its reaper watches the worker's heartbeat
    worker = processes.start("worker", ["workers"], env)
    wait_for(lambda: _worker_state(redis) == "idle", 120, "the worker to load its model")
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    ids = [
        queue.enqueue(keys.GENERATE_FUNC, BUSY_BODY, result_ttl=600, failure_ttl=600).id for _ in range(JOBS)
    ]
    wait_for(lambda: _worker_state(redis) == "busy", 60, "the worker to be busy")

    if fault == "crash":
        own_redis.process.kill()  # SIGKILL: what the AOF holds survives, nothing else
        own_redis.process.wait(10)
        wait_for(lambda: _logged(tmp_path / "worker.log", "redis_lost"), 60, "the worker to notice")
        assert worker.poll() is None
        own_redis.restart()
    else:
        own_redis.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(STALL)  # the fault itself: Redis answers nothing for longer than a heartbeat lives
        finally:
            own_redis.process.send_signal(signal.SIGCONT)

    wait_for(lambda: _all_ended(redis, ids), 180, "every job to end")
    assert [fetch_job(job_id, redis).get_status() for job_id in ids] == ["finished"] * JOBS
    assert [len(redis.xrange(f"rq:results:{job_id}")) for job_id in ids] == [1] * JOBS
    wait_for(lambda: _worker_state(redis) == "idle", 30, "the worker to be ready again")
    assert worker.poll() is None  # nobody restarted it
