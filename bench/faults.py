"""Faults under load, on loopback, bounded, and stopping by itself.

1. Worker deaths: 100 jobs while one gpu-single worker is SIGKILLed three times mid-job and
   restarted. Every job must finish exactly once; prints how long each death took to notice.
2. A Redis restart under load (SIGKILL, then the same data dir; AOF with appendfsync always): a
   client keeps submitting; every answer must be 202, 429 or 503; prints the recovery time; every
   accepted job must finish.
Writes JSON to bench/results/faults.json.

    .venv/bin/python bench/faults.py [--jobs 100] [--kills 3]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import click
import requests
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import wait_ready, write_results  # noqa: E402
from cli.up import free_port  # noqa: E402
from shared.jobstore import lifecycle, rqstore  # noqa: E402

BODY = {
    "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
    "max_tokens": 12,
    "temperature": 0,
}
TERMINAL = ("finished", "failed", "rejected")


class Cluster:
    """Redis, API, scheduler and workers as child processes in one folder."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.api_port = folder, free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.redis = Redis(port=self.port)
        self.children: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
        self.env.update(
            {
                "GPTOSS_REDIS_URL": f"redis://127.0.0.1:{self.port}/0",
                "GPTOSS_AUTH": "false",
                "GPTOSS_RESPONSE_CACHE": "false",  # repeats must run, not be answered from the cache
                "GPTOSS_API_PORT": str(self.api_port),
                "GPTOSS_HEARTBEAT_INTERVAL": "0.5",
                "GPTOSS_HEARTBEAT_TTL": "3",
                "GPTOSS_JOB_MAX_RETRIES": "5",
                "GPTOSS_LOG_FORMAT": "json",
                "GPTOSS_SCHEDULER_METRICS_PORT": "0",
                "GPTOSS_WORKER_METRICS_PORT": "0",
            }
        )

    def start_redis(self) -> None:
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]
        self.children["redis"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.redis.ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def start(self, name: str, module: str, **extra: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115
        child = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env={**self.env, **extra}, stdout=log, stderr=log
        )
        self.children[name] = child
        return child

    def busy_workers(self, queue: str) -> list[dict]:
        found = list(self.redis.scan_iter(match="gptoss:heartbeat:worker:*"))
        beats = [json.loads(raw) for raw in self.redis.mget(found) if raw] if found else []
        return [b for b in beats if b["queue"] == queue and b["state"] == "busy"]

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            if child.poll() is None:
                child.terminate()
        for child in self.children.values():
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_all(base: str, ids: list[str], timeout: float = 600) -> dict[str, str]:
    deadline, ends = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and len(ends) < len(ids):
        for job_id in ids:
            if job_id not in ends:
                status = requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()["status"]
                if status in TERMINAL:
                    ends[job_id] = status
        time.sleep(1.0)
    return ends


def worker_deaths(cluster: Cluster, jobs: int, kills: int) -> dict:
    """Phase 1: kill the busy gpu-single worker `kills` times while `jobs` jobs run."""
    ids = [requests.post(f"{cluster.base}/v1/jobs", json=BODY, timeout=10).json()["id"] for _ in range(jobs)]
    detections: list[float] = []
    for round_ in range(kills):
        while not cluster.busy_workers("gpu-single"):
            time.sleep(0.05)
        victim = cluster.busy_workers("gpu-single")[0]
        job_id = victim["current_job"]
        stream = f"gptoss:stream:{job_id}"
        before = sum(1 for _, f in cluster.redis.xrange(stream) if f[b"event"] == b"retry")
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        while True:  # noticed when the reaper puts the job back: one more retry event on its stream
            if sum(1 for _, f in cluster.redis.xrange(stream) if f[b"event"] == b"retry") > before:
                detections.append(time.time() - killed_at)
                break
            time.sleep(0.05)
        cluster.start(f"worker-single-{round_ + 1}", "workers", GPTOSS_WORKER_QUEUE="gpu-single")
    ends = wait_all(cluster.base, ids)
    results = {job_id: rqstore.result_count(job_id, cluster.redis) for job_id in ids}
    return {
        "jobs": jobs,
        "kills": kills,
        "ended": dict(Counter(ends.values())),
        "not_ended": jobs - len(ends),
        "delivered_twice": sum(1 for n in results.values() if n > 1),
        "detection_seconds": [round(d, 2) for d in detections],
        "retried_jobs": sum(1 for j in ids if _retries(cluster, j) > 0),
    }


def _retries(cluster: Cluster, job_id: str) -> int:
    job = lifecycle.fetch(cluster.redis, job_id)
    return lifecycle.read(job).retries if job is not None else 0


def redis_restart(cluster: Cluster, seconds_down: float) -> dict:
    """Phase 2: keep submitting while Redis is killed and restarted."""
    answers: Counter[str] = Counter()
    accepted: list[str] = []
    running = True
    first_202_after: list[float] = []
    back_at = [0.0]

    def client() -> None:
        while running:
            try:
                answer = requests.post(f"{cluster.base}/v1/jobs", json=BODY, timeout=30)
                answers[str(answer.status_code)] += 1
                if answer.status_code == 202:
                    accepted.append(answer.json()["id"])
                    if back_at[0] and not first_202_after:
                        first_202_after.append(time.time() - back_at[0])
            except requests.RequestException as exc:
                answers[f"client_error:{type(exc).__name__}"] += 1
            time.sleep(0.1)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(2)
    cluster.children["redis"].kill()
    cluster.children["redis"].wait()
    time.sleep(seconds_down)
    cluster.start_redis()
    back_at[0] = time.time()
    while not first_202_after and time.time() - back_at[0] < 60:
        time.sleep(0.05)
    time.sleep(2)
    running = False
    thread.join()
    ends = wait_all(cluster.base, accepted)
    return {
        "answers": dict(answers),
        "only_202_429_503": set(answers) <= {"202", "429", "503"},
        "recovery_seconds": round(first_202_after[0], 2) if first_202_after else None,
        "accepted": len(accepted),
        "ended": dict(Counter(ends.values())),
        "lost": len(accepted) - len(ends),
    }


@click.command()
@click.option("--jobs", default=100, show_default=True)
@click.option("--kills", default=3, show_default=True)
@click.option("--seconds-down", default=3.0, show_default=True)
def main(jobs: int, kills: int, seconds_down: float) -> None:
    """Run both phases and print/write the figures."""
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-faults-")))
    try:
        cluster.start_redis()
        cluster.start("api", "api")
        cluster.start("scheduler", "scheduler")
        cluster.start("worker-single-0", "workers", GPTOSS_WORKER_QUEUE="gpu-single")
        cluster.start("worker-multi", "workers", GPTOSS_WORKER_QUEUE="gpu-multi")
        wait_ready(cluster.base, 120)
        record = {
            "benchmark": "faults",
            "worker_deaths": worker_deaths(cluster, jobs, kills),
            "redis_restart": redis_restart(cluster, seconds_down),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        cluster.stop()
    print(json.dumps(record, indent=2))
    write_results("faults", record)
    deaths, restart = record["worker_deaths"], record["redis_restart"]
    ok = (
        deaths["not_ended"] == 0
        and deaths["delivered_twice"] == 0
        and deaths["ended"] == {"finished": jobs}
        and restart["only_202_429_503"]
        and restart["lost"] == 0
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
