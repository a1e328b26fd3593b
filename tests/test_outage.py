"""A Redis outage: the API answers 503 with Retry-After (never 500), processes reconnect by
themselves, and jobs accepted before the outage survive it (AOF) and finish."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import requests
from redis import Redis

from cli.up import free_port
from tests.conftest import Processes, http_ok, poll_job, process_env, wait_for

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
