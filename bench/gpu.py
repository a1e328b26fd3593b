"""gpt-oss-20b-sized serving through the whole pipeline (Redis, API, scheduler, one gpu-single
worker) on a GPU, the model built from gpt-oss-20b's real configuration with random weights
(`gpt-oss-20b-random`, workers/random_model.py). Scaled down (`--device cpu`: 32 times smaller
model, short prompts, few tokens) it runs in the CPU test suite.

    python bench/gpu.py [--device cuda] [--out DIR] [--budget 480]
    python bench/gpu.py --device cpu --out DIR

Steps, in priority order, each under its own time limit, the whole run under `--budget` seconds;
DIR/gpu.json is rewritten as each step ends, so a run cut short keeps what it measured:

1. `pipeline_1`: requests one at a time; 2. `pipeline_16`: 16 at once. TTFT p50/p95 from the job's
   own stamps (its arrival at the API to its first token: random weights produce no harmony text
   for a client to time), end-to-end latency, tokens/s.
3. `raw_generate`: `model.generate` in this process (the stack stopped), one stream and the
   `pipeline_16` prompts left-padded into one batch.
4. `observability_off`: `pipeline_16` again on a stack with GPTOSS_OBSERVABILITY=false (the ratio).
5. `pipeline_64`: 64 at once; 6. `transformers_serve`: only with `--serve-folder` (it loads weights
   from disk; random weights have none, and writing 42 GB would spend the device's budget).

Every request: prompts of 100-2,000 tokens (drawn, seeded), 128 new tokens, `cache: false`, greedy;
the worker runs with GPTOSS_IGNORE_EOS so random weights still make every token. Prints the ratios
and the targets (gpt-oss-20b TTFT under 2 s; latency 0.5-2 s).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import Cluster, cpu_flags, settled_view, start_transformers_serve, wait_ready  # noqa: E402

TTFT_TARGET_S = 2.0
"""The seed's target for gpt-oss-20b: first token within 2 s."""
LATENCY_BAND_S = (0.5, 2.0)
"""The seed's latency band."""


@dataclass(frozen=True)
class Scale:
    """What one run sends: the model, prompt lengths (tokens), new tokens, request counts."""

    model: str
    prompt_tokens: tuple[int, int]
    new_tokens: int
    singles: int
    together: int
    most: int
    limits: dict[str, float]


SCALES = {
    "cuda": Scale("gpt-oss-20b-random", (100, 2000), 128, 8, 16, 64,
                  {"start": 240, "pipeline_1": 150, "pipeline_16": 120, "raw_generate": 150,
                   "observability_off": 180, "pipeline_64": 150, "transformers_serve": 240}),
    "cpu": Scale("gpt-oss-20b-random-mini", (20, 120), 8, 3, 4, 8,
                 {"start": 180, "pipeline_1": 120, "pipeline_16": 120, "raw_generate": 120,
                  "observability_off": 240, "pipeline_64": 120, "transformers_serve": 180}),
}  # fmt: skip
"""Per device: the full-size run, and the scaled-down one the tests run."""

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river mountain ocean forest city music "
         "light water story engine garden market window letter answer").split()  # fmt: skip


def prompts(scale: Scale, count: int, seed: int) -> list[str]:
    """`count` user messages of about `scale.prompt_tokens` tokens each (one word is about a token)."""
    rng = random.Random(seed)
    low, high = scale.prompt_tokens
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Stack:
    """Redis, the API, the scheduler and one gpu-single worker serving `scale.model` on `device`."""

    def __init__(self, scale: Scale, device: str, work: Path, observability: bool = True):
        env = {"GPTOSS_AUTH": "false", "GPTOSS_MODEL": scale.model, "GPTOSS_DEVICE": device,
               "GPTOSS_IGNORE_EOS": "true", "GPTOSS_MAX_BATCH_SIZE": str(scale.most),
               "GPTOSS_OBSERVABILITY": str(observability).lower(), "GPTOSS_RESPONSE_CACHE": "false",
               "GPTOSS_DATA_DIR": str(work / "data")}  # fmt: skip
        for name in ("GPTOSS_TIKTOKEN_DIR", "GPTOSS_CACHE_DIR"):  # where the vocabulary and model folders are
            if name in os.environ:
                env[name] = os.environ[name]
        folder = Path(tempfile.mkdtemp(prefix="gptoss-gpu-", dir=work))
        self.scale, self.cluster = scale, Cluster(folder, env, fsync="everysec")
        self.base = self.cluster.base

    def start(self, timeout: float) -> dict[str, Any]:
        """Start every process; return once the worker answered a first request (its figures)."""
        self.cluster.start_redis()
        self.cluster.start("api", "api")
        self.cluster.start("scheduler", "scheduler")
        self.cluster.start_worker("gpu-single")
        wait_ready(self.base, timeout, path="/healthz")  # /readyz wants a gpu-multi worker too
        view = self.send("warm up", 2)
        return {"warm_up_e2e_s": view["timestamps"]["finished"] - view["timestamps"]["received"]}

    def send(self, text: str, tokens: int | None = None) -> dict[str, Any]:
        """One job to its settled view (its event stream followed, as a client does)."""
        body: dict[str, Any] = {"model": self.scale.model, "messages": [{"role": "user", "content": text}],
                "max_tokens": tokens or self.scale.new_tokens, "temperature": 0, "cache": False}  # fmt: skip
        answer = requests.post(f"{self.base}/v1/jobs", json=body, timeout=60)
        answer.raise_for_status()
        view = settled_view(requests, self.base, answer.json(), timeout=600)
        if view["status"] != "finished":
            raise RuntimeError(f"job {view['id']} ended {view['status']}: {view.get('error')}")
        return view

    def stop(self) -> None:
        self.cluster.stop()


def figures(views: list[dict[str, Any]], client_s: float) -> dict[str, Any]:
    """TTFT, end-to-end latency and tokens/s of settled job views."""
    stamps = [v["timestamps"] for v in views]
    ttft = [s["first_token"] - s["received"] for s in stamps]
    e2e = [s["finished"] - s["received"] for s in stamps]
    made = [v["result"]["usage"]["completion_tokens"] for v in views]
    decode = [
        (n - 1) / (s["finished"] - s["first_token"]) for n, s in zip(made, stamps, strict=True) if n > 1
    ]
    span = max(s["finished"] for s in stamps) - min(s["received"] for s in stamps)
    return {"requests": len(views), "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": percentile(ttft, 0.95), "e2e_p50_s": statistics.median(e2e),
            "e2e_p95_s": percentile(e2e, 0.95),
            "prompt_tokens": [v["result"]["usage"]["prompt_tokens"] for v in views],
            "completion_tokens": sum(made), "tokens_per_second": sum(made) / span,
            "decode_tokens_per_second_per_request_p50": statistics.median(decode) if decode else None,
            "client_seconds": client_s}  # fmt: skip


def pipeline(stack: Stack, texts: list[str], together: int) -> dict[str, Any]:
    """`texts` sent `together` at a time; their figures."""
    started = time.perf_counter()
    with ThreadPoolExecutor(together) as pool:
        views = list(pool.map(stack.send, texts))
    return figures(views, time.perf_counter() - started)


def raw_generate(scale: Scale, device: str, texts: list[str]) -> dict[str, Any]:
    """`model.generate` on the same weights, in this process: one stream, then `texts` as one
    left-padded batch; tokens/s with prefill included, as the pipeline's are."""
    import torch

    from shared.contract import ChatMessage, JobRequest
    from shared.harmony import HarmonyChat
    from shared.registry import model_spec
    from shared.settings import Settings
    from workers.model_store import prepare
    from workers.random_model import build_random

    settings = Settings()
    spec = model_spec(scale.model)
    folder = prepare(spec, settings.cache_dir, vocab_dir=settings.vocab_dir())
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_random(folder, dtype, device, attn_implementation="eager").eval()
    chat = HarmonyChat(settings.vocab_dir())
    rows = [chat.render(JobRequest(messages=[ChatMessage(role="user", content=t)])) for t in texts]
    pad = int(model.config.pad_token_id)

    def run(batch: list[list[int]]) -> float:
        width = max(len(r) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=scale.new_tokens,
                                 min_new_tokens=scale.new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=pad)  # fmt: skip
        sync()
        return (out.shape[1] - width) * len(batch) / (time.perf_counter() - started)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run(rows[:1])  # warm up
    single = [run([row]) for row in rows[:2]]
    batched = run(rows)
    return {"single_tokens_per_second": max(single), "batch_rows": len(rows),
            "batch_tokens_per_second": batched, "dtype": str(dtype)}  # fmt: skip


def serve(scale: Scale, folder: Path, work: Path, texts: list[str]) -> dict[str, Any]:
    """`texts` at once against `transformers serve --continuous-batching` on the weights in `folder`."""
    process, base = start_transformers_serve(folder, "bfloat16", work)
    try:
        wait_ready(base, 180, process, path="/health")

        def chat(text: str) -> int:
            body: dict[str, Any] = {"model": str(folder), "messages": [{"role": "user", "content": text}],
                    "max_tokens": scale.new_tokens, "temperature": 0, "stream": False}  # fmt: skip
            answer = requests.post(f"{base}/v1/chat/completions", json=body, timeout=600)
            answer.raise_for_status()
            return int(answer.json()["usage"]["completion_tokens"])

        chat(texts[0])
        started = time.perf_counter()
        with ThreadPoolExecutor(len(texts)) as pool:
            made = sum(pool.map(chat, texts))
        return {"requests": len(texts), "tokens_per_second": made / (time.perf_counter() - started)}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


class Run:
    """The steps' results, written to `out`/`name`.json as each ends; the whole run under `budget` s."""

    def __init__(self, out: Path, budget: float, record: dict[str, Any], name: str = "gpu"):
        self.out, self.deadline, self.record, self.name = out, time.monotonic() + budget, record, name
        self.record["steps"] = {}

    def step(self, name: str, limit: float, work: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run `work` for at most `limit` seconds (less when the budget is nearly spent); its result,
        or None when it failed, timed out or had no time left (recorded as such)."""
        limit = min(limit, self.deadline - time.monotonic())
        if limit < 10:
            return self.ended(name, {"skipped": "the run's time budget is spent"}, None)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = work()
            except Exception as exc:  # recorded; the next step still runs
                box["error"] = f"{type(exc).__name__}: {exc}"

        started = time.monotonic()
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(limit)
        seconds = round(time.monotonic() - started, 1)
        if thread.is_alive():
            return self.ended(name, {"error": f"timed out after {seconds} s"}, None)
        if "error" in box:
            return self.ended(name, {"error": box["error"], "seconds": seconds}, None)
        return self.ended(name, {**box["result"], "seconds": seconds}, box["result"])

    def ended(
        self, name: str, shown: dict[str, Any], result: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Record step `name` as `shown`, write the file; `result`."""
        self.record["steps"][name] = shown
        self.write()
        print(f"{name}: {json.dumps(shown)}", flush=True)
        return result

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.name}.json").write_text(json.dumps(self.record, indent=2) + "\n")


def on_stack(run: Run, scale: Scale, device: str, work: Path, steps: list[tuple[str, Callable[[Stack], Any]]],
             observability: bool = True) -> None:  # fmt: skip
    """Start a stack (its start recorded as `start_<first step>`), run `steps` on it (each under its
    own limit), stop it."""
    stack = Stack(scale, device, work, observability)
    try:
        if (
            run.step(
                f"start_{steps[0][0]}", scale.limits["start"], lambda: stack.start(scale.limits["start"])
            )
            is None
        ):
            return
        for name, work_on in steps:
            if run.step(name, scale.limits[name], lambda w=work_on: w(stack)) is None:  # type: ignore[misc]
                return  # what runs on a stack after a failed step would not be measured alone
    finally:
        stack.stop()


def summary(steps: dict[str, Any]) -> dict[str, float]:
    """The ratios, where both sides were measured."""
    one, many, raw, dark = (steps.get(k, {}) for k in ("pipeline_1", "pipeline_16", "raw_generate",
                                                        "observability_off"))  # fmt: skip
    pairs = {
        "pipeline_1_vs_raw_single": (one.get("tokens_per_second"), raw.get("single_tokens_per_second")),
        "pipeline_16_vs_raw_batch": (many.get("tokens_per_second"), raw.get("batch_tokens_per_second")),
        "observability_on_vs_off_tokens_per_second": (many.get("tokens_per_second"),
                                                      dark.get("tokens_per_second")),
        "observability_on_vs_off_ttft_p50": (many.get("ttft_p50_s"), dark.get("ttft_p50_s")),
    }  # fmt: skip
    return {name: a / b for name, (a, b) in pairs.items() if a and b}


@click.command()
@click.option("--device", default="cuda", show_default=True, help="cuda (full size) or cpu (scaled down)")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "bench" / "results",
              show_default=True, help="Folder of gpu.json")  # fmt: skip
@click.option("--budget", default=480.0, show_default=True, help="Seconds for the whole run")
@click.option("--serve-folder", type=click.Path(path_type=Path), default=None,
              help="Weights on disk for `transformers serve --continuous-batching` (step 6)")  # fmt: skip
def main(device: str, out: Path, budget: float, serve_folder: Path | None) -> None:
    scale = SCALES["cuda" if device.startswith("cuda") else "cpu"]
    record: dict[str, Any] = {"model": scale.model, "device": device, "cpu_flags": cpu_flags(),
                              "new_tokens": scale.new_tokens, "prompt_tokens": scale.prompt_tokens,
                              "at": time.time()}  # fmt: skip
    if device.startswith("cuda"):
        import torch

        record["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    run = Run(out, budget, record)
    singles, together = prompts(scale, scale.singles, 1), prompts(scale, scale.together, 2)
    with tempfile.TemporaryDirectory(prefix="gptoss-gpu-bench-") as tmp:
        work = Path(tmp)
        first = [("pipeline_1", lambda s: pipeline(s, singles, 1)),
                 ("pipeline_16", lambda s: pipeline(s, together, scale.together))]  # fmt: skip
        on_stack(run, scale, device, work, first)  # type: ignore[arg-type]
        run.step("raw_generate", scale.limits["raw_generate"], lambda: raw_generate(scale, device, together))
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # the raw model's memory, for the next stack's worker
        dark = [("observability_off", lambda s: pipeline(s, together, scale.together))]
        on_stack(run, scale, device, work, dark, observability=False)  # type: ignore[arg-type]
        most = prompts(scale, scale.most, 3)
        on_stack(run, scale, device, work, [("pipeline_64", lambda s: pipeline(s, most, scale.most))])
    if serve_folder is None:
        run.ended(
            "transformers_serve",
            {"skipped": "needs weights on disk (--serve-folder); random weights have none"},
        )
    else:
        limit = scale.limits["transformers_serve"]
        run.step(
            "transformers_serve",
            limit,
            lambda: serve(scale, serve_folder, Path(tempfile.mkdtemp()), together),
        )
    record["ratios"] = summary(record["steps"])
    one = record["steps"].get("pipeline_1", {})
    record["targets"] = {
        "ttft_p95_under_2s": one.get("ttft_p95_s", float("inf")) < TTFT_TARGET_S,
        "e2e_p50_in_band": LATENCY_BAND_S[0] <= one.get("e2e_p50_s", float("inf")) <= LATENCY_BAND_S[1],
    }
    run.write()
    for name, value in record["ratios"].items():
        print(f"{name}: {value:.2f}x")
    print(
        f"target TTFT < {TTFT_TARGET_S} s (1 at a time, p95): {one.get('ttft_p95_s')} s;"
        f" latency {LATENCY_BAND_S[0]}-{LATENCY_BAND_S[1]} s (e2e p50): {one.get('e2e_p50_s')} s"
    )


if __name__ == "__main__":
    main()
