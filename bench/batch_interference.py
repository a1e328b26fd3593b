"""What a running batch costs interactive traffic: interactive TTFT p50/p95 without a batch, then with
a `--lines` (2,000) line batch running, on one stack, the same requests at the same times.

Our stack as `gptoss up` runs it (Redis, the API, the scheduler with its batch feeder, one worker per
worker queue; auth on, one API key) on `--model` (tiny-gpt-oss: a 2,000-line batch ends in minutes on
a CPU). Interactive traffic: `--requests` streamed chat completions of the data set's short prompts
(≤ 200 tokens, `--interactive-tokens` out, `cache: false`) as a seeded Poisson process at `--rate`.
Phase `alone` sends them on an idle stack; then the batch is uploaded with the official client
(`client.files.create(purpose="batch")`, `client.batches.create(endpoint="/v1/chat/completions")`),
and once its lines hold their share of a worker's batch, phase `batch` sends the same requests at
the same times. Throughout, a sampler reads the batch queues' lengths (`incoming:batch` and the
worker queues' `:batch`) and the running ledger every 0.1 s. Prints and writes
bench/results/batch_interference.json: TTFT/E2E p50/p95 per phase with the server's share (routing,
waiting for a slot, then for the first token, from each job's stamps), the ratio batch / alone, the
TTFT SLA of the model (shared/models.toml, as shared/sla.py reads it) and whether p95 met it, the
batch's throughput (lines/s and output tokens/s, create to `completed`), the largest number of batch
jobs ever waiting and of lines ever running on one worker (against `size - reserved`).

    .venv/bin/python bench/batch_interference.py            # 2,000 lines, 40 interactive at 1/s
    .venv/bin/python bench/batch_interference.py --quick    # 200 lines, 10 interactive
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency import Outcome, poisson_arrivals, summarise  # noqa: E402
from bench.serving import slo_of  # noqa: E402
from bench.stack import Cluster, cpu_flags, write_results  # noqa: E402
from bench.tenants import (  # noqa: E402
    SHORT_PROMPT_TOKENS,
    TenantOutcome,
    over,
    read_stages,
    samples,
    stages,
    stream_as,
)
from bench.traffic import ChatServer, Prompt, draw, load_prompts, open_loop  # noqa: E402
from shared import keys  # noqa: E402
from shared.apikeys import create_key  # noqa: E402
from shared.jobstore import ledger  # noqa: E402
from shared.jobstore.rqstore import queue_key  # noqa: E402
from workers.fair_share import reserved_rows  # noqa: E402

SEED = 23
SAMPLE_EVERY = 0.1
"""Seconds between two readings of the batch queues and the running ledger."""
ENDED = ("completed", "failed", "expired", "cancelled")
"""Batch statuses it never leaves."""
STAGES = ("routing", "slot_wait", "to_first_token")
"""The server's share of an interactive request's TTFT, from its job's stamps (bench/tenants.py)."""


class QueueSampler:
    """Reads, every SAMPLE_EVERY s until stopped, how many batch jobs wait in each batch queue and how
    many of them each worker runs; keeps the largest of each."""

    def __init__(self, cluster: Cluster):
        self._redis, self._stop = cluster.redis, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.waiting_max, self.queue_max, self.samples = 0, Counter[str](), 0
        self.lines_running_max = 0  # on one worker
        self.waiting_series: list[tuple[float, int]] = []

    def start(self) -> None:
        self._began = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (at once if it never started)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def lines_running(self) -> int:
        """Batch jobs the busiest worker runs now."""
        per_worker = Counter(
            r.worker for r in ledger.running(self._redis).values() if r.queue in keys.BATCH_QUEUES
        )
        return max(per_worker.values(), default=0)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            pipe = self._redis.pipeline(transaction=False)
            for name in keys.BATCH_QUEUES:
                pipe.llen(queue_key(name))
            lengths = dict(zip(keys.BATCH_QUEUES, pipe.execute(), strict=True))
            for name, length in lengths.items():
                self.queue_max[name] = max(self.queue_max[name], int(length))
            total = sum(int(n) for n in lengths.values())
            self.waiting_max = max(self.waiting_max, total)
            self.lines_running_max = max(self.lines_running_max, self.lines_running())
            self.waiting_series.append((round(time.perf_counter() - self._began, 2), total))
            self.samples += 1


def batch_file(prompts: list[Prompt], model: str, tokens: int) -> bytes:
    """The JSONL of a batch of chat completions, one line per prompt (`cache: false`: each generated)."""
    rows = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": p.messages, "max_tokens": tokens, "temperature": 0,
                      "cache": False}}
            for i, p in enumerate(prompts)]  # fmt: skip
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def output_tokens(client: Any, file_id: str | None) -> tuple[int, int]:
    """Lines answered 200 in an output file and their completion tokens."""
    if not file_id:
        return 0, 0
    answered = tokens = 0
    for line in client.files.content(file_id).text.splitlines():
        response = (json.loads(line).get("response") or {}) if line.strip() else {}
        if response.get("status_code") == 200:
            answered += 1
            tokens += ((response.get("body") or {}).get("usage") or {}).get("completion_tokens", 0)
    return answered, tokens


def wait_for(check: Any, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f} ms"


def phase_figures(outcomes: list[TenantOutcome], slo: Any) -> dict[str, Any]:
    s = summarise(list[Outcome](outcomes), slo)
    keep = ("requests", "failed", "errors", "ttft_s", "e2e_s", "itl_s", "ttft_met")
    return {**{k: s[k] for k in keep}, **stages(outcomes)}


@click.command()
@click.option("--model", default="tiny-gpt-oss", show_default=True, help="Model the stack serves")
@click.option("--lines", default=2000, show_default=True, help="Lines of the batch")
@click.option("--line-tokens", default=32, show_default=True, help="max_tokens of each line")
@click.option("--rate", default=1.0, show_default=True, help="Interactive requests/s (Poisson)")
@click.option("--requests", "count", default=40, show_default=True, help="Interactive requests per phase")
@click.option(
    "--interactive-tokens", default=32, show_default=True, help="max_tokens of each interactive request"
)
@click.option("--batch-size", default=8, show_default=True, help="Rows a worker decodes at once")
@click.option("--reserved", default=None, type=int, help="GPTOSS_BATCH_RESERVED_SLOTS; unset: the default")
@click.option(
    "--slo-profile", default="latency_first", show_default=True, help="Profile whose e2e_sla_s counts"
)
@click.option("--quick", is_flag=True, help="A smoke: 200 lines, 10 interactive requests")
def main(
    model: str,
    lines: int,
    line_tokens: int,
    rate: float,
    count: int,
    interactive_tokens: int,
    batch_size: int,
    reserved: int | None,
    slo_profile: str,
    quick: bool,
) -> None:
    """Both phases against one stack; the figures printed and written."""
    import openai

    if quick:
        lines, count = 200, 10
    slo, flags = slo_of(model, slo_profile), cpu_flags()
    data = load_prompts()
    short = [p for p in data if p.prompt_tokens <= SHORT_PROMPT_TOKENS] or data
    interactive = [replace(p, max_tokens=interactive_tokens) for p in draw(short, count, SEED)]
    times = poisson_arrivals(rate, count, SEED)
    held_back = reserved_rows(batch_size, reserved)
    env = {"GPTOSS_AUTH": "true", "GPTOSS_MODEL": model, "GPTOSS_MAX_BATCH_SIZE": str(batch_size),
           "GPTOSS_RATE_LIMIT_REQUESTS": "1000000", "GPTOSS_RATE_LIMIT_TOKENS": str(10**9)}  # fmt: skip
    if reserved is not None:
        env["GPTOSS_BATCH_RESERVED_SLOTS"] = str(reserved)
    print(f"batch_interference: {model}, batch {batch_size} ({held_back} reserved: lines hold at most "
          f"{batch_size - held_back}); batch of {lines} lines, {line_tokens} tokens out; interactive: "
          f"{count} requests at {rate}/s, {interactive_tokens} tokens out, prompts ≤ {SHORT_PROMPT_TOKENS} "
          f"tokens; TTFT SLA {slo.ttft_s} s; {os.cpu_count()} cores {flags}", flush=True)  # fmt: skip
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-batch-interference-")), env, fsync="everysec")
    sampler = QueueSampler(cluster)
    began = time.monotonic()
    try:
        cluster.start_all(300)
        key, _ = create_key(cluster.redis, "bench")
        client = openai.OpenAI(base_url=f"{cluster.base}/v1", api_key=key, max_retries=0, timeout=120)
        extra = {"cache": False, "stream_options": {"include_usage": True}}
        server = ChatServer("ours", cluster.base, model, extra)
        for prompt in interactive[:2]:  # warm-up, not counted: the first loads what loads lazily
            stream_as(server, replace(prompt, max_tokens=4), key)
        send = lambda p: stream_as(server, p, key)  # noqa: E731
        alone = cast(list[TenantOutcome], open_loop(send, interactive, times))
        print(f"alone: TTFT p95 {ms(phase_figures(alone, slo)['ttft_s']['p95'])}", flush=True)
        upload = batch_file(draw(short, lines, SEED + 1), model, line_tokens)
        under: list[TenantOutcome] = []

        def phase() -> None:
            under.extend(cast(list[TenantOutcome], open_loop(send, interactive, times)))

        batch = run_batch(client, sampler, upload, batch_size - held_back, phase)
        read_stages(cluster, [*alone, *under])
    finally:
        sampler.stop()
        cluster.stop()
    phases = {"alone": phase_figures(alone, slo), "batch": phase_figures(under, slo)}
    ratio = {q: over(phases["batch"]["ttft_s"][q], phases["alone"]["ttft_s"][q]) for q in ("p50", "p95")}
    p95 = phases["batch"]["ttft_s"]["p95"]
    within = p95 is not None and p95 <= slo.ttft_s
    report(phases, ratio, slo.ttft_s, within, batch, sampler, batch_size - held_back)
    write_results("batch_interference", {
        "benchmark": "batch_interference", "model": model, "quick": quick, "seed": SEED,
        "batch_size": batch_size, "reserved_slots": held_back,
        "interactive": {"rate": rate, "requests": count, "max_tokens": interactive_tokens,
                        "prompt_tokens_at_most": SHORT_PROMPT_TOKENS},
        "phases": phases, "ttft_ratio_batch_over_alone": ratio,
        "ttft_sla_s": slo.ttft_s, "slo": vars(slo), "ttft_p95_within_sla": within,
        "batch": {"lines": lines, "max_tokens": line_tokens, **batch},
        "batch_jobs_waiting_max": sampler.waiting_max, "batch_queue_max": dict(sampler.queue_max),
        "lines_running_on_one_worker_max": sampler.lines_running_max, "queue_samples": sampler.samples,
        "waiting_series": sampler.waiting_series[:: max(1, len(sampler.waiting_series) // 500)],
        "samples": {"alone": samples(alone), "batch": samples(under)},
        "cpu_count": os.cpu_count(), "cpu_flags": flags, "seconds": round(time.monotonic() - began, 1),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })  # fmt: skip


def run_batch(
    client: Any, sampler: QueueSampler, upload: bytes, share: int, phase: Callable[[], None]
) -> dict[str, Any]:
    """Upload and create the batch, run `phase` once its lines hold their `share` of a worker's batch,
    wait for it to end: what it did, timed from the upload to `completed` as a client sees it."""
    sampler.start()
    created = time.perf_counter()
    file = client.files.create(file=("lines.jsonl", io.BytesIO(upload)), purpose="batch")
    job = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    full = wait_for(lambda: sampler.lines_running() >= share, 300, 0.05)
    phase()
    still_running = client.batches.retrieve(job.id).status not in ENDED
    wait_for(lambda: client.batches.retrieve(job.id).status in ENDED, 3600, 1.0)
    seconds = time.perf_counter() - created
    sampler.stop()
    final = client.batches.retrieve(job.id)
    answered, tokens = output_tokens(client, final.output_file_id)
    return {
        "id": final.id, "status": final.status, "seconds": round(seconds, 1),
        "request_counts": final.request_counts.model_dump() if final.request_counts else {},
        "lines_answered": answered, "output_tokens": tokens,
        "lines_per_second": answered / seconds, "output_tokens_per_second": tokens / seconds,
        "filled_its_share_before_phase": full, "running_throughout_phase": still_running,
    }  # fmt: skip


def report(
    phases: dict[str, Any],
    ratio: dict[str, float | None],
    sla: float,
    within: bool,
    batch: dict[str, Any],
    sampler: QueueSampler,
    share: int,
) -> None:
    """The figures, printed."""
    for name, s in phases.items():
        server = "; ".join(f"{k} {ms(s[k]['p50'])} / {ms(s[k]['p95'])}" for k in STAGES)
        print(f"interactive {name:<6} TTFT p50 {ms(s['ttft_s']['p50'])}, p95 {ms(s['ttft_s']['p95'])}; "
              f"E2E p50 {ms(s['e2e_s']['p50'])}, p95 {ms(s['e2e_s']['p95'])}; failed {s['failed']}; "
              f"server p50/p95: {server}")  # fmt: skip
    shown = ", ".join(f"{q} {v:.2f}x" for q, v in ratio.items() if v)
    verdict = "yes" if within else "no"
    print(f"TTFT with / without the batch: {shown}; p95 within the TTFT SLA of {sla} s: {verdict}")
    print(f"batch: {batch['status']} {batch['request_counts']}, {batch['lines_answered']} lines in "
          f"{batch['seconds']} s: {batch['lines_per_second']:.1f} lines/s, "
          f"{batch['output_tokens_per_second']:.0f} tokens/s (running throughout the phase: "
          f"{batch['running_throughout_phase']}); batch jobs waiting at most {sampler.waiting_max} "
          f"({dict(sampler.queue_max)}); lines running on one worker at most "
          f"{sampler.lines_running_max} (limit {share})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
