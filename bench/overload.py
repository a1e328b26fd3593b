"""Overload: a burst of about 20x what the workers can drain, against `gptoss up` on loopback.

Measures the drain rate first, then fires a bounded burst from many client threads. Checks that
every answer is 202 or 429 (with Retry-After), none is 5xx, every accepted job ends (finished,
failed or rejected), and the backlog (sampled from /admin/capacity) never exceeds its budget.
Prints the counts and the p50/p99 queue wait, and writes JSON to bench/results/.

    .venv/bin/python bench/overload.py [--budget 16] [--factor 20] [--threads 32]
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import write_results  # noqa: E402
from cli.up import free_port  # noqa: E402

ADMIN_KEY = "overload-bench"
BODY = {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 4, "temperature": 0}
TERMINAL = ("finished", "failed", "rejected")


def start(folder: Path, budget: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
    env.update({"GPTOSS_API_PORT": str(port), "GPTOSS_DATA_DIR": str(folder / "data"),
                "GPTOSS_BACKLOG_BUDGET": str(budget), "GPTOSS_TENANT_BACKLOG_BUDGET": str(budget),
                "GPTOSS_ADMIN_KEY": ADMIN_KEY, "GPTOSS_AUTH": "false", "GPTOSS_SCHEDULER_METRICS_PORT": "0",
                "GPTOSS_WORKER_METRICS_PORT": "0", "GPTOSS_LOG_FORMAT": "json",
                "GPTOSS_RESPONSE_CACHE": "false"})  # fmt: skip  # repeats must queue, not hit the cache
    log = open(folder / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "cli", "up"], cwd=ROOT, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                return up, base
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("stack not ready")


def wait_terminal(base: str, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if view["status"] in TERMINAL:
            return view
        time.sleep(0.1)
    return view


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@click.command()
@click.option("--budget", default=16, show_default=True, help="GPTOSS_BACKLOG_BUDGET of the stack.")
@click.option("--factor", default=20, show_default=True, help="Burst size over what drains meanwhile.")
@click.option("--threads", default=32, show_default=True, help="Concurrent client threads.")
@click.option("--seconds", default=5.0, show_default=True, help="Length of the burst.")
def main(budget: int, factor: int, threads: int, seconds: float) -> None:
    """Run the burst and print/write the figures."""
    folder = Path(tempfile.mkdtemp(prefix="gptoss-overload-"))
    up, base = start(folder, budget)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        began = time.perf_counter()
        for view in [wait_terminal(base, requests.post(f"{base}/v1/jobs", json=BODY, timeout=10).json()["id"])
                     for _ in range(8)]:  # fmt: skip
            assert view["status"] == "finished", view
        drain = 8 / (time.perf_counter() - began)  # jobs/s, one at a time: a floor of what drains
        total = max(int(factor * drain * seconds), 2 * budget)
        answers: Counter[str] = Counter()
        accepted: list[str] = []
        missing_retry_after = 0
        peak = 0
        sampling = True

        def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(
                    peak, requests.get(f"{base}/admin/capacity", headers=admin, timeout=5).json()["backlog"]
                )
                time.sleep(0.02)

        def fire(_: int) -> None:
            nonlocal missing_retry_after
            answer = requests.post(f"{base}/v1/jobs", json=BODY, timeout=30)
            answers[str(answer.status_code)] += 1
            if answer.status_code == 202:
                accepted.append(answer.json()["id"])
            elif answer.status_code == 429 and not answer.headers.get("Retry-After"):
                missing_retry_after += 1

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        burst_started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fire, range(total)))
        burst_seconds = time.perf_counter() - burst_started
        views = [wait_terminal(base, job_id) for job_id in accepted]
        sampling = False
        sampler.join()
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    ends = Counter(v["status"] for v in views)
    waits = [v["timestamps"]["started"] - v["timestamps"]["received"] for v in views
             if v["status"] == "finished"]  # fmt: skip
    record = {
        "benchmark": "overload", "budget": budget, "drain_jobs_per_second": drain, "burst_requests": total,
        "burst_seconds": burst_seconds, "threads": threads, "answers": dict(answers),
        "server_errors": sum(n for code, n in answers.items() if code.startswith("5")),
        "unexpected_answers": sum(n for code, n in answers.items() if code not in ("202", "429")),
        "missing_retry_after": missing_retry_after, "accepted": len(accepted), "ended": dict(ends),
        "not_ended": len(accepted) - sum(ends.values()), "peak_backlog": peak,
        "backlog_within_budget": peak <= budget,
        "queue_wait_seconds": {"p50": percentile(waits, 0.5), "p99": percentile(waits, 0.99),
                               "mean": statistics.fmean(waits) if waits else None},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    print(json.dumps(record, indent=2))
    write_results("overload", record)
    ok = record["unexpected_answers"] == 0 and record["not_ended"] == 0 and record["backlog_within_budget"]
    raise SystemExit(0 if ok and missing_retry_after == 0 else 1)


if __name__ == "__main__":
    main()
