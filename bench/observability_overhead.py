"""Cost of observability: one workload against two stacks, everything on versus everything off.

Both stacks (`gptoss up`, each with its own Redis) run at once on the embedded model; requests go
to them alternately, one at a time, so both see the same machine. "On" is metrics, 100% tracing
(spans written to a file) and info logs; "off" is GPTOSS_OBSERVABILITY=false with warning logs.
Prints E2E p50/p95 per stack and the on/off ratios, each with a bootstrap 95% interval (the run's
requests resampled: on this 2-core machine single runs vary by about ±2%), and writes JSON with
every sample to bench/results/.

    .venv/bin/python bench/observability_overhead.py [--requests 200] [--max-tokens 16]
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import settled_view, wait_ready, write_results  # noqa: E402
from cli.up import free_port  # noqa: E402

PROMPT = [{"role": "user", "content": "Name three rivers in Europe."}]


def start_stack(name: str, folder: Path, extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`gptoss up` with its own Redis and ports; (process, API URL)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
    env.update({"GPTOSS_API_PORT": str(port), "GPTOSS_DATA_DIR": str(folder / name / "data"),
                "GPTOSS_SCHEDULER_METRICS_PORT": str(free_port()), "GPTOSS_WORKER_METRICS_PORT": "0",
                "GPTOSS_LOG_FORMAT": "json", "GPTOSS_AUTH": "false",
                "GPTOSS_RESPONSE_CACHE": "false", **extra})  # fmt: skip  # repeats must generate
    log = open(folder / f"{name}.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "cli", "up"], cwd=ROOT, env=env, stdout=log, stderr=log)
    return up, f"http://127.0.0.1:{port}"


def one_request(base: str, max_tokens: int) -> tuple[float, float]:
    """(client-side E2E, server-side E2E from the job's stage timestamps), seconds."""
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    job = requests.post(f"{base}/v1/jobs", json=body, timeout=10).json()
    view = settled_view(requests, base, job, timeout=60)
    client = time.perf_counter() - started
    if view["status"] != "finished":
        raise SystemExit(f"job ended {view['status']}: {view.get('error')}")
    stamps = view["timestamps"]
    return client, stamps["finished"] - stamps["received"]


BOOTSTRAP_ROUNDS = 2000


def quantiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[18], "mean": statistics.fmean(values)}


def ratio_interval(on: list[float], off: list[float], quantile: str) -> tuple[float, float]:
    """95% bootstrap interval of quantile(on) / quantile(off), each sample resampled on its own."""
    rng = random.Random(0)
    ratios = sorted(
        quantiles(rng.choices(on, k=len(on)))[quantile] / quantiles(rng.choices(off, k=len(off)))[quantile]
        for _ in range(BOOTSTRAP_ROUNDS)
    )
    return ratios[int(0.025 * BOOTSTRAP_ROUNDS)], ratios[int(0.975 * BOOTSTRAP_ROUNDS) - 1]


def paired_median(on: list[float], off: list[float]) -> dict[str, float]:
    """Median of on/off over requests sent back to back (pair i: the i-th of each stack), with its
    95% bootstrap interval: each pair saw the same moment of the machine, so drift cancels."""
    pairs = [a / b for a, b in zip(on, off, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(pairs, k=len(pairs))) for _ in range(BOOTSTRAP_ROUNDS))
    return {
        "median": statistics.median(pairs),
        "low": medians[int(0.025 * BOOTSTRAP_ROUNDS)],
        "high": medians[int(0.975 * BOOTSTRAP_ROUNDS) - 1],
    }


@click.command()
@click.option("--requests", "count", default=200, show_default=True, help="Requests per stack.")
@click.option("--max-tokens", default=16, show_default=True)
@click.option("--warmup", default=3, show_default=True, help="Unmeasured requests per stack first.")
def main(count: int, max_tokens: int, warmup: int) -> None:
    """Run the comparison and print/write the figures."""
    folder = Path(tempfile.mkdtemp(prefix="gptoss-obs-bench-"))
    configs = {
        "on": {"GPTOSS_OBSERVABILITY": "true", "GPTOSS_TRACE_SAMPLE_RATIO": "1.0",
               "GPTOSS_TRACE_DIR": str(folder / "spans"), "GPTOSS_LOG_LEVEL": "info"},
        "off": {"GPTOSS_OBSERVABILITY": "false", "GPTOSS_LOG_LEVEL": "warning"},
    }  # fmt: skip
    stacks = {name: start_stack(name, folder, extra) for name, extra in configs.items()}
    try:
        for _, base in stacks.values():
            wait_ready(base, 180)
        for _ in range(warmup):
            for _, base in stacks.values():
                one_request(base, max_tokens)
        samples: dict[str, dict[str, list[float]]] = {n: {"client": [], "server": []} for n in stacks}
        for i in range(count):
            # Alternate which stack goes first, so neither always follows the other.
            order = list(stacks) if i % 2 == 0 else list(reversed(stacks))
            for name in order:
                client, server = one_request(stacks[name][1], max_tokens)
                samples[name]["client"].append(client)
                samples[name]["server"].append(server)
    finally:
        for up, _ in stacks.values():
            up.send_signal(signal.SIGINT)
        for up, _ in stacks.values():
            up.wait(60)
    figures = {name: {kind: quantiles(v) for kind, v in s.items()} for name, s in samples.items()}
    ratios = {
        kind: {q: figures["on"][kind][q] / figures["off"][kind][q] for q in ("p50", "p95")}
        for kind in ("client", "server")
    }
    paired = {kind: paired_median(samples["on"][kind], samples["off"][kind]) for kind in ("client", "server")}
    intervals = {
        kind: {q: ratio_interval(samples["on"][kind], samples["off"][kind], q) for q in ("p50", "p95")}
        for kind in ("client", "server")
    }
    record = {"benchmark": "observability_overhead", "requests_per_stack": count, "max_tokens": max_tokens,
              "model": "smollm2-135m", "seconds": figures, "ratio_on_over_off": ratios,
              "ratio_95_interval": intervals, "paired_ratio_median": paired, "target": 1.01,
              "samples_s": samples,
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    for kind in ("client", "server"):
        on, off = figures["on"][kind], figures["off"][kind]
        print(f"{kind:6s} E2E  on  p50 {on['p50'] * 1000:7.1f} ms  p95 {on['p95'] * 1000:7.1f} ms")
        print(f"{kind:6s} E2E  off p50 {off['p50'] * 1000:7.1f} ms  p95 {off['p95'] * 1000:7.1f} ms")
        ratio, (p50_low, p50_high), (p95_low, p95_high) = ratios[kind], *intervals[kind].values()
        print(
            f"{kind:6s} ratio on/off  p50 {ratio['p50']:.3f} [{p50_low:.3f}, {p50_high:.3f}]"
            f"  p95 {ratio['p95']:.3f} [{p95_low:.3f}, {p95_high:.3f}]  (target ≤ 1.01)"
        )
        pair = paired[kind]
        print(f"{kind:6s} paired median on/off {pair['median']:.3f} [{pair['low']:.3f}, {pair['high']:.3f}]")
    write_results("observability_overhead", record)


if __name__ == "__main__":
    main()
