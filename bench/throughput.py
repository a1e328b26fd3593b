"""Throughput on the embedded model, side by side in one run: raw `model.generate` (one stream,
and 16 requests left-padded into one batch: the model's own batched rate, the ceiling of the
pipeline's), the full pipeline (API -> scheduler -> batching worker) with 1 request at a time and with 16 at
once, and `transformers serve --continuous-batching` on the same model and prompts (when it
installs and starts: `pip install "transformers[serving]"`). Prints tokens/s and the ratios, and
writes JSON to bench/results/throughput.json.

    .venv/bin/python bench/throughput.py [--tokens 64] [--concurrent 16] [--single-runs 6] [--pairs 3]

Pipeline tokens/s use the job's own stage stamps (received -> finished), so how the client waits
does not count; raw generate is timed around the call. Single streams run in turns, raw then
pipeline, the same number of times each; each figure is the best of its runs (the CPU may be shared;
the best run is the least disturbed), and the median of the paired ratios is printed too. Greedy
decoding, so every system makes the same number of tokens for the same prompt unless it stops at an
end token (counted as made).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import settled_view, start_transformers_serve, wait_ready, write_results  # noqa: E402
from cli.up import free_port  # noqa: E402

MODEL = "smollm2-135m"
ROUNDS = 2
"""Rounds of concurrent requests per system (the best one counts)."""
TOPICS = ["a cat", "the sea", "a robot", "winter", "bread", "a king", "music", "the moon",
          "a river", "chess", "rain", "a train", "coffee", "a forest", "the sun", "a clock"]  # fmt: skip


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]


def model_folder() -> Path:
    from shared.registry import model_spec
    from shared.settings import Settings
    from workers.model_store import prepare

    return prepare(model_spec(MODEL), Settings().cache_dir)


def worker_dtypes(folder: Path, concurrent: int) -> tuple[str, Any, bool, Any]:
    """The device a worker of batch size `concurrent` runs on, the dtype it computes in, whether
    its small steps multiply in bf16 (workers/cpu_precision.py), and the dtype the weights are
    stored in (they differ on a CPU without native bf16)."""
    import torch

    from shared.registry import model_spec
    from shared.settings import Settings
    from workers.placement import Placement
    from workers.runtime import load_dtype, pick_device

    spec, device = model_spec(MODEL), pick_device(None)
    placement = Placement("device", device)
    computed, bf16_path = load_dtype(spec, Settings(max_batch_size=concurrent), placement, folder)
    return device, computed, bf16_path, getattr(torch, spec.dtype)


class RawGenerate:
    """The model loaded as `dtype` on `device` (with bf16 small steps when `bf16_path`, as a worker
    does), one stream at a time through `model.generate`."""

    def __init__(self, folder: Path, dtype: Any, device: str, bf16_path: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workers.cpu_precision import add_bf16_path

        self.torch, self.device = torch, device
        self.dtype = f"{dtype} with bf16 small steps" if bf16_path else str(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        if bf16_path:
            add_bf16_path(self.model)

    def rate(self, i: int, tokens: int) -> float:
        """Tokens/s of one greedy generation for request `i`, prefill included."""
        ids = self.tokenizer.apply_chat_template(messages(i), add_generation_prompt=True, return_tensors="pt")
        ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to(self.device)
        started = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        return float((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))

    def batch_rate(self, rows: int, tokens: int) -> float:
        """Tokens/s of one greedy `generate` of requests 0..rows-1 left-padded into one batch,
        prefill included: what the model itself does with `rows` requests at once (each row's
        tokens counted up to its end token)."""
        texts = [self.tokenizer.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=False)
                 for i in range(rows)]  # fmt: skip
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        started = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        seconds = time.perf_counter() - started
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        ends = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        made = sum(next((k + 1 for k, t in enumerate(row) if t in ends), len(row)) for row in new)
        return made / seconds


def start_stack(folder: Path, concurrent: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
    env.update({"GPTOSS_API_PORT": str(port), "GPTOSS_DATA_DIR": str(folder / "data"), "GPTOSS_AUTH": "false",
                "GPTOSS_MAX_BATCH_SIZE": str(concurrent), "GPTOSS_SCHEDULER_METRICS_PORT": "0",
                "GPTOSS_WORKER_METRICS_PORT": "0", "GPTOSS_LOG_FORMAT": "json",
                "GPTOSS_RESPONSE_CACHE": "false"})  # fmt: skip  # measure generation, not cache hits
    log = open(folder / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "cli", "up"], cwd=ROOT, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 240, up)
    return up, base


def run_job(base: str, i: int, tokens: int) -> dict[str, Any]:
    """Submit request `i` and follow it to its settled view (its event stream, as a client would:
    tight polling by 16 clients would take CPU from the worker)."""
    body = {"messages": messages(i), "max_tokens": tokens, "temperature": 0}
    job = requests.post(f"{base}/v1/jobs", json=body, timeout=10).json()
    view = settled_view(requests, base, job)
    if view["status"] != "finished":
        raise SystemExit(f"job {job['id']} ended {view['status']}: {view.get('error')}")
    return view


def stages(views: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds between the stage stamps of `views` (where the pipeline's time goes)."""
    order = ["received", "scheduled", "started", "first_token", "finished"]
    return {
        f"{a}->{b}": sum(v["timestamps"][b] - v["timestamps"][a] for v in views) / len(views)
        for a, b in zip(order, order[1:], strict=False)
    }


def spread(views: list[dict[str, Any]], stage: str) -> float:
    """Seconds between the first and the last of `views` to reach `stage`."""
    at = [v["timestamps"][stage] for v in views]
    return max(at) - min(at)


def single_streams(
    raw: RawGenerate, stored: RawGenerate | None, base: str, tokens: int, runs: int
) -> dict[str, Any]:
    """Raw generate (in the worker's dtype, and in the stored dtype when that differs) and the
    pipeline, one request at a time, in turns (a run of each, then again): all see the machine as
    it is at that moment, the stack idle while raw generate runs."""
    raw.rate(0, tokens)  # warm up all
    if stored is not None:
        stored.rate(0, tokens)
    run_job(base, 0, tokens)
    raw_rates, stored_rates, views = [], [], []
    for i in range(runs):
        raw_rates.append(raw.rate(i, tokens))
        if stored is not None:
            stored_rates.append(stored.rate(i, tokens))
        views.append(run_job(base, i, tokens))
    rates = [
        v["result"]["usage"]["completion_tokens"]
        / (v["timestamps"]["finished"] - v["timestamps"]["received"])
        for v in views
    ]
    return {
        "raw": {"dtype": raw.dtype, "runs_tokens_per_second": raw_rates,
                "tokens_per_second": max(raw_rates)},
        "raw_stored_dtype": {"dtype": stored.dtype, "runs_tokens_per_second": stored_rates,
                             "tokens_per_second": max(stored_rates)} if stored is not None else None,
        "pipeline": {"runs_tokens_per_second": rates, "tokens_per_second": max(rates),
                     "stages_s": stages(views)},
        "paired_ratio_median": statistics.median(p / r for p, r in zip(rates, raw_rates, strict=True)),
    }  # fmt: skip


def concurrent_round(base: str, tokens: int, concurrent: int) -> dict[str, Any]:
    """`concurrent` requests at once. Rates are server-side (first received -> last finished) and
    client-side (first POST -> last answer, as transformers serve is timed)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        views = list(pool.map(lambda i: run_job(base, i, tokens), range(concurrent)))
    client = time.perf_counter() - started
    made = sum(v["result"]["usage"]["completion_tokens"] for v in views)
    span = max(v["timestamps"]["finished"] for v in views) - min(v["timestamps"]["received"] for v in views)
    return {"tokens": made, "seconds": span, "tokens_per_second": made / span,
            "client_seconds": client, "client_tokens_per_second": made / client,
            "stages_s": stages(views), "received_spread_s": spread(views, "received"),
            "start_spread_s": spread(views, "started"),
            "finish_spread_s": spread(views, "finished")}  # fmt: skip


def knee(raw: RawGenerate, base: str, tokens: int, concurrent: int, pairs: int) -> dict[str, Any]:
    """The knee, in `pairs` paired runs: the model's own left-padded batch of `concurrent` (the stack
    idle), then the pipeline with `concurrent` requests at once; the median of the paired ratios,
    and the best of each with every run kept."""
    raw_rates, rounds = [], []
    for _ in range(pairs):
        raw_rates.append(raw.batch_rate(concurrent, tokens))
        rounds.append(concurrent_round(base, tokens, concurrent))
    ratios = [r["tokens_per_second"] / b for r, b in zip(rounds, raw_rates, strict=True)]
    best = max(rounds, key=lambda r: r["tokens_per_second"])
    return {"raw_batch_runs_tokens_per_second": raw_rates, "raw_batch_tokens_per_second": max(raw_rates),
            "pipeline": {**best, "requests": concurrent, "rounds": rounds}, "paired_ratios": ratios,
            "paired_ratio_median": statistics.median(ratios)}  # fmt: skip


def transformers_serve(folder: Path, tokens: int, concurrent: int, work: Path, dtype: str) -> dict[str, Any]:
    """16 concurrent chat requests against `transformers serve --continuous-batching`, computing in
    the worker's dtype."""
    serve, base = start_transformers_serve(folder, dtype, work)
    try:
        try:
            wait_ready(base, 180, serve, path="/health")
        except SystemExit:
            return {"error": "transformers serve did not start; see " + str(work / "serve.log")}

        def chat(i: int) -> int:
            body = {"model": str(folder), "messages": messages(i), "max_tokens": tokens, "temperature": 0,
                    "stream": False}  # fmt: skip
            answer = requests.post(f"{base}/v1/chat/completions", json=body, timeout=600)
            answer.raise_for_status()
            return int(answer.json()["usage"]["completion_tokens"])

        chat(0)  # warm up (loads the model)
        rates = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrent) as pool:
                made = sum(pool.map(chat, range(concurrent)))
            rates.append(made / (time.perf_counter() - started))
        return {"rounds_tokens_per_second": rates, "tokens_per_second": max(rates), "requests": concurrent,
                "dtype": dtype}  # fmt: skip
    except requests.RequestException as exc:
        return {"error": f"transformers serve failed: {exc}"}
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(30)


@click.command()
@click.option("--tokens", default=64, help="max_tokens of every request")
@click.option("--concurrent", default=16, help="Requests at once (and the worker's batch size)")
@click.option(
    "--single-runs", default=6, help="Single requests timed, for raw generate and the pipeline each"
)
@click.option("--pairs", default=3, show_default=True, help="Paired runs of the knee (raw batch, pipeline)")
@click.option("--skip-serve", is_flag=True, help="Do not try transformers serve")
def main(tokens: int, concurrent: int, single_runs: int, pairs: int, skip_serve: bool) -> None:
    folder = model_folder()
    device, dtype, bf16_path, stored_dtype = worker_dtypes(folder, concurrent)
    raw_model = RawGenerate(folder, dtype, device, bf16_path)
    stored_model = RawGenerate(folder, stored_dtype, device) if stored_dtype != dtype else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up, base = start_stack(work, concurrent)
        try:
            single = single_streams(raw_model, stored_model, base, tokens, single_runs)
            # The model's own batched rate, the stack idle: how far batching can go on this machine.
            knees = knee(raw_model, base, tokens, concurrent, pairs)
            raw_batch, together = knees["raw_batch_tokens_per_second"], knees["pipeline"]
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(60)
        del raw_model, stored_model
        raw, piped = single["raw"], {"single": single["pipeline"], "concurrent": together}
        print(f"raw generate, 1 stream:        {raw['tokens_per_second']:7.1f} tokens/s"
              f" (best of {single_runs}, {raw['dtype']}, as the worker computes)")  # fmt: skip
        if (stored_raw := single["raw_stored_dtype"]) is not None:
            print(f"raw generate, 1 stream:        {stored_raw['tokens_per_second']:7.1f} tokens/s"
                  f" (best of {single_runs}, {stored_raw['dtype']}, as stored)")  # fmt: skip
        print(f"raw generate, {concurrent} rows:        {raw_batch:7.1f} tokens/s"
              " (one left-padded batch: the model's own batched rate)")  # fmt: skip
        print(f"pipeline, 1 request:           {piped['single']['tokens_per_second']:7.1f} tokens/s")
        client_rate = max(r["client_tokens_per_second"] for r in together["rounds"])
        print(f"pipeline, {concurrent} concurrent:       {together['tokens_per_second']:7.1f} tokens/s"
              f" ({client_rate:.1f} timed by the client)")  # fmt: skip
        serve = (
            {"skipped": True}
            if skip_serve
            else transformers_serve(folder, tokens, concurrent, work, str(dtype).removeprefix("torch."))
        )
    if "tokens_per_second" in serve:
        print(f"transformers serve (CB), {concurrent}:  {serve['tokens_per_second']:7.1f} tokens/s")
    else:
        print(f"transformers serve: {serve}")
    base_rate = raw["tokens_per_second"]
    ratios = {
        "pipeline_single_vs_raw": piped["single"]["tokens_per_second"] / base_rate,
        "pipeline_single_vs_raw_paired_median": single["paired_ratio_median"],
        "pipeline_concurrent_vs_raw_single": together["tokens_per_second"] / base_rate,
        # The most the 16-concurrent ratio can be here, and how much of it the pipeline reaches.
        "raw_batch_vs_raw_single": raw_batch / base_rate,
        "pipeline_concurrent_vs_raw_batch": together["tokens_per_second"] / raw_batch,
        # The knee: the median of the paired runs' ratios (each pipeline round against the raw batch
        # measured just before it).
        "pipeline_concurrent_vs_raw_batch_paired_median": knees["paired_ratio_median"],
    }
    if stored_raw is not None:  # against the faster single stream of the stored dtype, too
        ratios["pipeline_single_vs_raw_stored_dtype"] = (
            piped["single"]["tokens_per_second"] / stored_raw["tokens_per_second"]
        )
        ratios["pipeline_concurrent_vs_raw_single_stored_dtype"] = (
            together["tokens_per_second"] / stored_raw["tokens_per_second"]
        )
    if "tokens_per_second" in serve:
        # Both timed by the client, from the first request sent to the last answer.
        best_client = max(r["client_tokens_per_second"] for r in together["rounds"])
        ratios["pipeline_concurrent_vs_transformers_serve"] = best_client / serve["tokens_per_second"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    record = {
        "model": MODEL, "tokens": tokens, "concurrent": concurrent, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "device": device, "raw_generate": raw,
        "raw_generate_stored_dtype": stored_raw,
        "raw_generate_batch": {"rows": concurrent, "tokens_per_second": raw_batch,
                               "runs_tokens_per_second": knees["raw_batch_runs_tokens_per_second"]},
        "knee_paired_ratios": knees["paired_ratios"], "pipeline": piped,
        "transformers_serve": serve, "ratios": ratios, "at": time.time(),
    }  # fmt: skip
    write_results("throughput", record)


if __name__ == "__main__":
    main()
