"""Structured outputs on the embedded model (SmolLM2-135M), two sections, results in
bench/results/structured.json:

    .venv/bin/python bench/structured.py [--requests 200] [--steps 48] [--rounds 3]

`validity`: `--requests` chat requests through the whole pipeline (`gptoss up`'s processes, the
official `openai` client, 8 at a time) over the 10 schemas of bench/data/schemas.json (nested objects,
enums, arrays, required fields), greedy, max_tokens 200: how many parse and validate with
`jsonschema` (an answer cut by `finish_reason: "length"` counts as a failure).

`throughput`: the batch engine alone (no Redis), 16 rows decoding `--steps` steps, with k = 0, 4 and 16
rows under a grammar that never completes within them (an array of integers), the others free;
tokens/s of each, in turns, `--rounds` times (median); the target is 16 constrained >= 0.9x all free.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import Cluster, cpu_flags, wait_ready, write_results  # noqa: E402

SCHEMAS = json.loads((ROOT / "bench" / "data" / "schemas.json").read_text())
TOPICS = ["the sea", "a robot", "winter", "bread", "a king", "music", "the moon", "a river", "chess", "rain",
          "a train", "coffee", "a forest", "the sun", "a clock", "a cat", "a city", "a garden", "a ship",
          "a storm"]  # fmt: skip
ENDLESS = {"type": "array", "items": {"type": "integer"}}
"""A grammar that does not complete in a few dozen tokens: constrained rows decode every step."""


def validity(count: int) -> dict[str, Any]:
    """`count` requests over the schemas through the pipeline; how many parse and validate."""
    import jsonschema
    import openai

    env = {"GPTOSS_AUTH": "false", "GPTOSS_MODEL": "smollm2-135m", "GPTOSS_RESPONSE_CACHE": "false",
           "GPTOSS_MAX_BATCH_SIZE": "8"}  # fmt: skip
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-structured-")), env, fsync="everysec")
    cluster.start_redis()
    cluster.start("api", "api")
    cluster.start("scheduler", "scheduler")
    cluster.start_worker("gpu-single")
    wait_ready(cluster.base, 240, path="/healthz")
    client = openai.OpenAI(base_url=f"{cluster.base}/v1", api_key="none", max_retries=5, timeout=600)
    cases = [(SCHEMAS[i % len(SCHEMAS)], TOPICS[(i // len(SCHEMAS)) % len(TOPICS)]) for i in range(count)]

    def ask(case: tuple[dict[str, Any], str]) -> str | None:
        entry, topic = case
        try:
            answer = client.chat.completions.create(
                model="smollm2-135m", max_tokens=200, temperature=0,
                messages=[{"role": "user", "content": f"Give a {entry['name']} about {topic} as JSON."}],
                response_format={"type": "json_schema", "json_schema": {**entry, "strict": True}},
            )  # fmt: skip
            choice = answer.choices[0]
            if choice.finish_reason != "stop":
                return f"finish_reason {choice.finish_reason}"
            jsonschema.validate(json.loads(choice.message.content or ""), entry["schema"])
            return None
        except Exception as exc:  # counted as a failure, with why
            return f"{type(exc).__name__}: {str(exc)[:200]}"

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            failures = [f for f in pool.map(ask, cases) if f is not None]
        seconds = time.perf_counter() - started
    finally:
        cluster.stop()
    return {"requests": count, "valid": count - len(failures), "failures": failures[:20], "seconds": seconds}


def throughput(steps: int, rounds: int) -> dict[str, Any]:
    """Tokens/s of 16 rows with k = 0, 4, 16 of them constrained, in turns (medians of `rounds`)."""
    import torch

    from shared.contract import JobRequest
    from shared.registry import model_spec
    from shared.settings import Settings
    from workers.batch import Row
    from workers.runtime import ModelRuntime
    from workers.sampling import sampler_for

    runtime = ModelRuntime.load(model_spec("smollm2-135m"), Settings(max_batch_size=16))
    runtime.ignore_eos = True
    endless = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": ENDLESS}}

    def once(constrained: int) -> float:
        rows = []
        for i in range(16):
            extra = {"response_format": endless} if i < constrained else {}
            ask = [{"role": "user", "content": f"List numbers {i}."}]
            request = JobRequest.model_validate(
                {"messages": ask, "max_tokens": steps + 1, "temperature": 0, **extra}
            )
            completion = runtime.completion(request)
            rows.append(Row(str(i), completion, sampler_for(request, runtime.device, completion.constraint)))
        batch = runtime.new_batch()
        started = time.perf_counter()
        with torch.inference_mode():
            batch.join(rows)
            for _ in range(steps):
                batch.step()
        return 16 * (steps + 1) / (time.perf_counter() - started)

    once(16)  # warm up (and build llguidance's view of the tokenizer)
    runs: dict[int, list[float]] = {0: [], 4: [], 16: []}
    for _ in range(rounds):
        for k in runs:
            runs[k].append(once(k))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"runs_tokens_per_second": {str(k): v for k, v in runs.items()},
            "tokens_per_second": {str(k): v for k, v in medians.items()},
            "ratio_16_vs_0": medians[16] / medians[0], "ratio_4_vs_0": medians[4] / medians[0],
            "device": runtime.device, "dtype": str(runtime.model.dtype)}  # fmt: skip


@click.command()
@click.option("--requests", "count", default=200, show_default=True)
@click.option("--steps", default=48, show_default=True, help="Decode steps per throughput run")
@click.option("--rounds", default=3, show_default=True)
@click.option("--skip-validity", is_flag=True)
def main(count: int, steps: int, rounds: int, skip_validity: bool) -> None:
    record: dict[str, Any] = {"cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "at": time.time()}
    if not skip_validity:
        record["validity"] = validity(count)
        v = record["validity"]
        print(f"validity: {v['valid']}/{v['requests']} parse and validate ({v['seconds']:.0f} s)")
        for failure in v["failures"]:
            print(f"  failed: {failure}")
    record["throughput"] = t = throughput(steps, rounds)
    for k, rate in t["tokens_per_second"].items():
        print(f"throughput, 16 rows, {k:>2} constrained: {rate:7.1f} tokens/s")
    print(
        f"16 constrained vs all free: {t['ratio_16_vs_0']:.2f}x (target >= 0.9x); 4: {t['ratio_4_vs_0']:.2f}x"
    )
    write_results("structured", record)


if __name__ == "__main__":
    main()
