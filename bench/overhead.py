"""Per-request overhead, side by side in one run: (a) a 1-token chat completion (`max_tokens: 1`,
`cache: false`, not streamed) through the pipeline (Redis, the API, the scheduler and one gpu-single
worker), (b) the raw model's prefill and one token in this process (loaded as that worker loads
it; the prompt rendered, one forward pass with a KV cache, the token picked and decoded; and the
same through `model.generate(max_new_tokens=1)`), and (c) a bare RQ round trip (enqueue a trivial
function → a long-running RQ SimpleWorker on the same Redis → its result). One request of each in
turns, `--requests` times, the machine otherwise idle. Prints the p50s, the pipeline's added time
(a − b) and its ratio to bare RQ (target ≤ 2×), and where the pipeline's time goes, stage by stage
from the job's stamps (GET /v1/jobs/<id>: received, scheduled, started, first_token, finished) and
the client's send and answer times, as medians. Writes bench/results/overhead.json.

    .venv/bin/python bench/overhead.py [--requests 50] [--without-observability]

With `--without-observability` a second stack with GPTOSS_OBSERVABILITY=false (no spans, no
metrics, no structured logs' trace ids) is asked in the same turns: what observability costs here.

Redis runs as `gptoss up` runs it (AOF fsynced every second); the worker decodes up to the default
batch size, so its dtype is the one a batching worker picks on this machine.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import requests
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency import percentile  # noqa: E402
from bench.stack import Cluster, cpu_flags, wait_ready, write_results  # noqa: E402

MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Write a long story about a cat."}]
BARE_QUEUE = "bench-bare-rq"
WARM_UP = 3
"""Requests of each kind sent first and not counted."""
STAGES = ("sent", "received", "scheduled", "started", "first_token", "finished", "answered")
"""The client's send, the job's stamps in order, the client's answer."""


def start_pipeline(observability: bool = True) -> Cluster:
    """Redis, the API, the scheduler and one gpu-single worker; ready to answer."""
    env = {"GPTOSS_AUTH": "false", "GPTOSS_MODEL": MODEL, "GPTOSS_OBSERVABILITY": str(observability).lower()}
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-overhead-")), env, fsync="everysec")
    cluster.start_redis()
    cluster.start("api", "api")
    cluster.start("scheduler", "scheduler")
    cluster.start_worker("gpu-single")
    wait_ready(cluster.base, 120, path="/healthz")  # /readyz wants a gpu-multi worker too
    return cluster


def pipeline_once(session: requests.Session, base: str) -> dict[str, float]:
    """One 1-token chat completion: the client's send and answer times and the job's stage stamps."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 1,
        "temperature": 0,
        "cache": False,
    }
    sent = time.time()
    answer = session.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    answered = time.time()
    answer.raise_for_status()
    view = session.get(f"{base}/v1/jobs/{answer.headers['X-Job-ID']}", timeout=30).json()
    stamps = {k: v for k, v in view["timestamps"].items() if v is not None}
    return {"sent": sent, **stamps, "answered": answered}


class RawPrefill:
    """The model loaded as the pipeline's worker loads it, asked for one token in this process."""

    def __init__(self) -> None:
        import torch

        from bench.throughput import RawGenerate, model_folder, worker_dtypes
        from shared.settings import Settings

        folder = model_folder()
        device, dtype, bf16_path, _ = worker_dtypes(folder, Settings().batch_size())
        self.torch, self.raw = torch, RawGenerate(folder, dtype, device, bf16_path)

    def prompt_ids(self) -> Any:
        """The prompt rendered by the model's chat template, as a tensor on the model's device."""
        tokenizer: Any = self.raw.tokenizer
        rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)  # fmt: skip
        return rendered["input_ids"].to(self.raw.device)

    def forward(self) -> float:
        """Seconds to render the prompt, run one forward pass with a KV cache (the logits of the last
        position only), pick and decode a token."""
        started = time.perf_counter()
        tokenizer, model, ids = self.raw.tokenizer, self.raw.model, self.prompt_ids()
        with self.torch.inference_mode():
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits  # as generate() does
        tokenizer.decode([int(logits[0, -1].argmax())])
        return time.perf_counter() - started

    def generate(self) -> float:
        """Seconds for the same through `model.generate(max_new_tokens=1)`."""
        started = time.perf_counter()
        tokenizer, model, ids = self.raw.tokenizer, self.raw.model, self.prompt_ids()
        with self.torch.inference_mode():
            out = model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=1,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        tokenizer.decode(out[0, ids.shape[1] :].tolist())
        return time.perf_counter() - started


class BareRq:
    """A long-running RQ SimpleWorker (JSON serializer, as ours) on its own queue of `redis_url`'s
    Redis, and a client that enqueues a trivial function and blocks for its result."""

    def __init__(self, redis_url: str, folder: Path):
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.redis = Redis.from_url(redis_url)  # no socket timeout: the result is read with XREAD BLOCK
        self.queue = Queue(BARE_QUEUE, connection=self.redis, serializer=JSONSerializer)
        log = open(folder / "bare-rq.log", "ab")  # noqa: SIM115
        env = {**os.environ, "RQ_REDIS_URL": redis_url}  # in the environment, not argv, which ps shows
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker", "-S", "json",
             BARE_QUEUE],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        )  # fmt: skip

    def round_trip(self) -> float:
        """Seconds from enqueueing `operator.add(1, 2)` to holding its result."""
        started = time.perf_counter()
        job = self.queue.enqueue("operator.add", 1, 2)
        result = job.latest_result(timeout=30)
        if result is None or result.return_value != 3:
            raise SystemExit(f"bare RQ round trip failed: {result}")
        return time.perf_counter() - started

    def stop(self) -> None:
        self.worker.terminate()
        self.worker.wait(30)


def stages(runs: list[dict[str, float]]) -> dict[str, float | None]:
    """Median seconds between consecutive stages (runs missing a stage are left out of its gaps)."""
    gaps = {}
    for a, b in zip(STAGES, STAGES[1:], strict=False):
        values = [r[b] - r[a] for r in runs if a in r and b in r]
        gaps[f"{a}->{b}"] = statistics.median(values) if values else None
    return gaps


def first_answer(session: requests.Session, base: str) -> None:
    """The first request, which waits for the worker to load."""
    deadline = time.monotonic() + 240
    while True:
        try:
            pipeline_once(session, base)
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def warm(call: Callable[[], Any]) -> None:
    for _ in range(WARM_UP):
        call()


@click.command()
@click.option("--requests", "count", default=50, show_default=True, help="Requests of each kind")
@click.option("--without-observability", "dark", is_flag=True,
              help="Also a stack with GPTOSS_OBSERVABILITY=false, asked in the same turns")  # fmt: skip
def main(count: int, dark: bool) -> None:
    """Run the three (four) in turns; print and write the figures."""
    raw = RawPrefill()
    clusters = [start_pipeline(), *([start_pipeline(observability=False)] if dark else [])]
    bare = BareRq(clusters[0].env["GPTOSS_REDIS_URL"], clusters[0].folder)
    session = requests.Session()
    try:
        for cluster in clusters:
            first_answer(session, cluster.base)
        once: Callable[[], Any] = lambda: pipeline_once(session, clusters[0].base)  # noqa: E731
        for call in (once, raw.forward, raw.generate, bare.round_trip):
            warm(call)
        runs, forward, generate, rq, dark_runs = [], [], [], [], []
        for _ in range(count):  # in turns: each sees the machine as it is at that moment
            runs.append(once())
            forward.append(raw.forward())
            generate.append(raw.generate())
            rq.append(bare.round_trip())
            if dark:
                dark_runs.append(pipeline_once(session, clusters[1].base))
    finally:
        bare.stop()
        for cluster in clusters:
            cluster.stop()
    pipeline = [r["answered"] - r["sent"] for r in runs]
    samples = {"pipeline": pipeline, "raw_forward": forward, "raw_generate": generate, "bare_rq": rq}
    if dark:
        samples["pipeline_without_observability"] = [r["answered"] - r["sent"] for r in dark_runs]
    p50 = {name: percentile(values, 0.5) or 0.0 for name, values in samples.items()}
    added = p50["pipeline"] - p50["raw_forward"]
    added_generate = p50["pipeline"] - p50["raw_generate"]
    print(f"overhead: {MODEL}, {count} requests of each, one at a time; "
          f"cpu {os.cpu_count()} cores {cpu_flags()}")  # fmt: skip
    print(f"(a) pipeline, 1-token chat completion:    p50 {1000 * p50['pipeline']:7.1f} ms")
    print(f"(b) raw prefill + 1 token (forward pass):  p50 {1000 * p50['raw_forward']:7.1f} ms")
    print(f"    raw prefill + 1 token (generate):      p50 {1000 * p50['raw_generate']:7.1f} ms")
    print(f"(c) bare RQ round trip:                    p50 {1000 * p50['bare_rq']:7.1f} ms")
    print(f"added by the pipeline (a - b forward):     {1000 * added:7.1f} ms"
          f" = {added / p50['bare_rq']:.1f}x bare RQ (target <= 2x)")  # fmt: skip
    print(f"added by the pipeline (a - b generate):    {1000 * added_generate:7.1f} ms"
          f" = {added_generate / p50['bare_rq']:.1f}x bare RQ")  # fmt: skip
    if dark:
        off = p50["pipeline_without_observability"] - p50["raw_forward"]
        print(f"added with GPTOSS_OBSERVABILITY=false:   {1000 * off:7.1f} ms"
              f" = {off / p50['bare_rq']:.1f}x bare RQ")  # fmt: skip
        for gap, seconds in stages(dark_runs).items():
            print(
                f"  {gap:<24} {'-' if seconds is None else f'{1000 * seconds:7.1f} ms'} (observability off)"
            )
    where = stages(runs)
    print("where the pipeline's time goes (medians):")
    for gap, seconds in where.items():
        print(f"  {gap:<24} {'-' if seconds is None else f'{1000 * seconds:7.1f} ms'}")
    record = {
        "benchmark": "overhead", "model": MODEL, "requests": count, "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(), "load_average": os.getloadavg(), "p50_s": p50,
        "p95_s": {name: percentile(values, 0.95) for name, values in samples.items()},
        "added_s": added, "added_over_bare_rq": added / p50["bare_rq"],
        "added_generate_s": added_generate, "added_generate_over_bare_rq": added_generate / p50["bare_rq"],
        "stages_p50_s": where, "without_observability": {"stages_p50_s": stages(dark_runs)} if dark else None,
        "samples": {"pipeline_stamps": runs, "raw_forward_s": forward,
                                           "raw_generate_s": generate, "bare_rq_s": rq},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    write_results("overhead", record)


if __name__ == "__main__":
    main()
