"""Does the server's TTFT agree with the client's? Streams a fixed prompt mix and compares, per
request, the client's TTFT (send to first chunk with text) with the server's (the job's `received`,
stamped when the request reached the API, to its `first_token`), as `gptoss_time_to_first_token_seconds`
observes it.

Cases: the shortest and the longest prompts of bench/data/prompts.jsonl (SmolLM2 tokens), each
sent sequentially (one at a time, `--rounds` times) and concurrently (all of a kind at once, so
they queue and batch). Per case it prints the medians, client ÷ server and the largest difference;
a case passes when the ratio of medians is within 0.95–1.05, or, where the client's TTFT is under
200 ms, when the medians are within 10 ms. Writes bench/results/ttft_fidelity.json.

    .venv/bin/python bench/ttft_fidelity.py [--rounds 5] [--per-kind 4] [--max-tokens 8]

The stack runs as `gptoss up` runs it (bench/stack.Cluster: Redis, the API, the scheduler and a
worker per queue), telemetry on, the response cache off for these requests (`cache: false`).
"""

from __future__ import annotations

import statistics
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

from bench.latency import Outcome  # noqa: E402
from bench.stack import Cluster, cpu_flags, write_results  # noqa: E402
from bench.traffic import ChatServer, Prompt, load_prompts, stream_chat  # noqa: E402

MODEL = "smollm2-135m"
RATIO_BAND = (0.95, 1.05)
"""Client ÷ server TTFT that counts as agreeing."""
FAST_TTFT_S, FAST_SLACK_S = 0.2, 0.010
"""Under FAST_TTFT_S the ratio is noise-dominated: agreeing there means within FAST_SLACK_S."""


def prompt_mix(per_kind: int, max_tokens: int) -> dict[str, list[Prompt]]:
    """The `per_kind` shortest and longest prompts of the data set, each asking `max_tokens` tokens."""
    ordered = sorted(load_prompts(), key=lambda p: (p.prompt_tokens, p.id))
    capped = lambda ps: [Prompt(p.id, p.messages, max_tokens, p.prompt_tokens) for p in ps]  # noqa: E731
    return {"short": capped(ordered[:per_kind]), "long": capped(ordered[-per_kind:])}


def server_ttft(base: str, outcome: Outcome) -> float | None:
    """The server's TTFT of the job behind a stream (its id is `chatcmpl-<job id>`)."""
    if not outcome.ok or outcome.response_id is None:
        return None
    job_id = outcome.response_id.removeprefix("chatcmpl-")
    stamps = requests.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()["timestamps"]
    received, first = stamps.get("received"), stamps.get("first_token")
    return first - received if received is not None and first is not None else None


def measure(server: ChatServer, prompts: list[Prompt], concurrent: bool) -> list[dict[str, Any]]:
    """Each prompt streamed (all at once when `concurrent`): its client and server TTFT."""
    if concurrent:
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            outcomes = list(pool.map(lambda p: stream_chat(server, p), prompts))
    else:
        outcomes = [stream_chat(server, p) for p in prompts]
    pairs = []
    for prompt, outcome in zip(prompts, outcomes, strict=True):
        if not outcome.ok:
            raise SystemExit(f"request {prompt.id} failed: {outcome.error}")
        pairs.append({"prompt": prompt.id, "prompt_tokens": prompt.prompt_tokens, "client_s": outcome.ttft,
                      "server_s": server_ttft(server.base, outcome)})  # fmt: skip
    return pairs


def summary(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of client and server TTFT, their ratio and difference, and whether they agree."""
    client = statistics.median(p["client_s"] for p in pairs)
    server = statistics.median(p["server_s"] for p in pairs)
    ratio, gap = client / server, client - server
    worst = max(abs(p["client_s"] - p["server_s"]) for p in pairs)
    within = RATIO_BAND[0] <= ratio <= RATIO_BAND[1] or (client < FAST_TTFT_S and abs(gap) <= FAST_SLACK_S)
    return {"requests": len(pairs), "client_ttft_s": client, "server_ttft_s": server, "ratio": ratio,
            "difference_s": gap, "largest_difference_s": worst, "agrees": within}  # fmt: skip


def show(case: str, s: dict[str, Any]) -> None:
    print(f"{case:<18}{s['requests']:>4}{1000 * s['client_ttft_s']:>10.1f}{1000 * s['server_ttft_s']:>10.1f}"
          f"{s['ratio']:>8.3f}{1000 * s['difference_s']:>9.1f}{1000 * s['largest_difference_s']:>9.1f}"
          f"{'yes' if s['agrees'] else 'NO':>7}", flush=True)  # fmt: skip


@click.command()
@click.option("--rounds", default=5, show_default=True, help="Times each prompt is sent sequentially")
@click.option("--per-kind", default=4, show_default=True, help="Short and long prompts each")
@click.option("--max-tokens", default=8, show_default=True, help="Tokens each request asks for")
@click.option("--batch-size", default=8, show_default=True, help="Rows the worker decodes at once")
def main(rounds: int, per_kind: int, max_tokens: int, batch_size: int) -> None:
    """Start the stack, stream the mix sequentially and concurrently, print and write the figures."""
    env = {"GPTOSS_AUTH": "false", "GPTOSS_MODEL": MODEL, "GPTOSS_MAX_BATCH_SIZE": str(batch_size)}
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-ttft-")), env, fsync="everysec")
    mix = prompt_mix(per_kind, max_tokens)
    cases: dict[str, Any] = {}
    try:
        cluster.start_all(300)
        server = ChatServer("ours", cluster.base, MODEL, {"cache": False})
        for prompt in mix["short"][:2]:  # warm-up, not counted: what loads lazily loads now
            stream_chat(server, prompt)
        print(f"{'case':<18}{'n':>4}{'client ms':>10}{'server ms':>10}{'c/s':>8}{'diff ms':>9}{'max ms':>9}"
              f"{'agrees':>7}")  # fmt: skip
        for kind, prompts in mix.items():
            sequential = [pair for _ in range(rounds) for pair in measure(server, prompts, False)]
            concurrent = [pair for _ in range(rounds) for pair in measure(server, prompts, True)]
            for name, pairs in ((f"{kind} sequential", sequential), (f"{kind} concurrent", concurrent)):
                cases[name] = {**summary(pairs), "pairs": pairs}
                show(name, cases[name])
    finally:
        cluster.stop()
    agreeing = sum(c["agrees"] for c in cases.values())
    print(f"{agreeing} of {len(cases)} cases agree (client ÷ server within {RATIO_BAND[0]}–{RATIO_BAND[1]},"
          f" or within {FAST_SLACK_S * 1000:.0f} ms under {FAST_TTFT_S * 1000:.0f} ms)")  # fmt: skip
    write_results("ttft_fidelity", {"model": MODEL, "rounds": rounds, "per_kind": per_kind,
                                    "max_tokens": max_tokens, "batch_size": batch_size, "cpu": cpu_flags(),
                                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "cases": cases})  # fmt: skip


if __name__ == "__main__":
    main()
