"""Caching through the real pipeline (`gptoss up`: API, scheduler, workers, each its own process) on
the embedded model. Each section is a function returning its figures; main runs them against one
stack and writes them under their own keys of bench/results/cache.json.

- `replay`: 1000 greedy requests over 200 distinct prompts, repeats drawn from a Zipf law, from a
  few client threads; hit rate, and hit vs miss p50 latency as a client sees it (from POST until
  the result is in hand: a hit's POST answers with it, a miss's follows the job's events to `done`).
  Targets: hit rate >= 70%, hit p50 <= 1% of miss p50. Also checks every hit is byte-identical to
  an answer generated for its prompt, and that all hits of a prompt are alike.
- `sessions`: five-turn chats (a long system prompt, short questions, greedy), each held twice side
  by side one turn at a time: as a session (`session_id`, so turns reuse the worker's KV cache) and
  without; TTFT per turn from the job's stamps (received -> first token), and cached prompt tokens.
  Target: turn-5 TTFT with reuse <= 0.5x without.

    .venv/bin/python bench/cache.py [--requests 1000] [--prompts 200] [--max-tokens 64] [--threads 4]
                                    [--conversations 6] [--section replay|sessions ...]
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import settled_view, wait_ready, write_results  # noqa: E402
from cli.up import free_port  # noqa: E402

MODEL = "smollm2-135m"
TOPICS = ["rivers", "bridges", "volcanoes", "libraries", "trains", "gardens", "bees", "clocks", "maps",
          "glaciers", "violins", "lighthouses", "deserts", "printing", "tides", "owls", "salt", "kites",
          "copper", "harbours"]  # fmt: skip
ANGLES = ["history", "science", "uses", "future", "myths", "dangers", "beauty", "economics", "records",
          "surprises"]  # fmt: skip


@contextmanager
def stack(folder: Path, extra: dict[str, str] | None = None) -> Iterator[str]:
    """`gptoss up` with its own Redis and ports, auth off and the response cache on; its API URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
    env.update({"GPTOSS_API_PORT": str(port), "GPTOSS_DATA_DIR": str(folder / "data"), "GPTOSS_AUTH": "false",
                "GPTOSS_RESPONSE_CACHE": "true", "GPTOSS_SCHEDULER_METRICS_PORT": "0",
                "GPTOSS_WORKER_METRICS_PORT": "0", "GPTOSS_LOG_FORMAT": "json", **(extra or {})})  # fmt: skip
    log = open(folder / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "cli", "up"], cwd=ROOT, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 240, up)
        yield base
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def prompt(i: int) -> str:
    """The i-th distinct prompt (200 distinct for i < 200)."""
    topic, angle = TOPICS[i % len(TOPICS)], ANGLES[(i // len(TOPICS)) % len(ANGLES)]
    return f"Write a short paragraph about the {angle} of {topic}."


def zipf_draws(count: int, distinct: int, exponent: float, seed: int) -> list[int]:
    """`count` prompt indices, rank k drawn with weight 1/k^exponent."""
    weights = [1 / k**exponent for k in range(1, distinct + 1)]
    return random.Random(seed).choices(range(distinct), weights=weights, k=count)


def one_request(session: requests.Session, base: str, index: int, max_tokens: int) -> tuple[str, float, str]:
    """(how it was answered: "hit" by the API, "worker_hit" by a worker without generating (from
    the cache as it started, or an identical request's result), "generated"; client-side seconds
    from POST until the result is in hand; its text)."""
    body = {"messages": [{"role": "user", "content": prompt(index)}], "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    started = time.perf_counter()
    answer = session.post(f"{base}/v1/jobs", json=body, timeout=30)
    if answer.status_code == 200:  # a hit: the finished job, result included
        view = answer.json()
        assert view["result"]["cache"] == "hit", view
        return "hit", time.perf_counter() - started, view["result"]["text"]
    if answer.status_code != 202:
        raise RuntimeError(f"POST answered {answer.status_code}: {answer.text[:200]}")
    job = answer.json()
    with session.get(f"{base}{job['url']}/events", stream=True, timeout=300) as events:
        kind = None
        for line in events.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind in ("done", "error"):
                data = json.loads(line[6:])
                if kind == "error":
                    raise RuntimeError(f"job {job['id']} failed: {data}")
                how = "worker_hit" if data.get("cache") == "hit" else "generated"
                return how, time.perf_counter() - started, data["text"]
    raise RuntimeError(f"job {job['id']}: the event stream ended without `done`")


def quantiles(values: list[float]) -> dict[str, float] | None:
    if len(values) < 2:
        return None
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[18], "mean": statistics.fmean(values)}


def replay(
    base: str, count: int = 1000, distinct: int = 200, max_tokens: int = 64, threads: int = 4,
    exponent: float = 1.0, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Replay `count` greedy requests over `distinct` prompts with Zipf repeats from `threads`
    clients; the figures (hit rate, hit and miss latency, byte-identity of hits)."""
    draws = zipf_draws(count, distinct, exponent, seed)
    lock, position = threading.Lock(), iter(range(count))
    hits: list[float] = []
    misses: list[float] = []
    answers: list[tuple[int, bool, str]] = []  # (prompt, hit?, text)
    worker_hits: list[float] = []  # answered by a worker without generating
    errors: list[str] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                n = next(position, None)
            if n is None:
                return
            try:
                how, seconds, text = one_request(session, base, draws[n], max_tokens)
                hit = how != "generated"
            except Exception as exc:  # counted and shown, never a silently dead client thread
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                {"hit": hits, "worker_hit": worker_hits, "generated": misses}[how].append(seconds)
                answers.append((draws[n], hit, text))

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    generated: dict[int, list[str]] = {}
    served: dict[int, set[str]] = {}
    for index, hit, text in answers:
        if hit:
            served.setdefault(index, set()).add(text)
        else:
            generated.setdefault(index, []).append(text)
    twice = [texts for texts in generated.values() if len(texts) > 1]
    hit_q, miss_q = quantiles(hits), quantiles(misses)
    ratio = hit_q["p50"] / miss_q["p50"] if hit_q and miss_q else None
    return {
        "requests": count, "distinct_prompts": distinct, "prompts_seen": len(set(draws)),
        "zipf_exponent": exponent, "max_tokens": max_tokens, "client_threads": threads,
        "hits": len(hits), "misses": len(misses), "hit_rate": len(hits) / count,
        "worker_hits": len(worker_hits), "worker_hit_seconds": quantiles(worker_hits),
        "hit_seconds": hit_q, "miss_seconds": miss_q, "hit_p50_over_miss_p50": ratio,
        # Every hit must be one of the answers generated for its prompt, and all hits of a prompt alike.
        "hits_not_byte_identical": sum(1 for index, hit, text in answers
                                       if hit and text not in generated.get(index, [])),
        "prompts_with_differing_hits": sum(1 for texts in served.values() if len(texts) > 1),
        # Identical misses decoded at once by one worker generate once (the others follow it);
        # on different workers each generates.
        "prompts_generated_more_than_once": len(twice),
        "of_which_generated_differently": sum(1 for texts in twice if len(set(texts)) > 1),
        "errors": len(errors), "first_errors": errors[:5],
        "wall_seconds": time.perf_counter() - started,
        "targets": {"hit_rate_min": 0.70, "hit_p50_over_miss_p50_max": 0.01},
    }  # fmt: skip


SYSTEM = (
    "You are a patient travel guide. You answer in two or three sentences, you mention one concrete "
    "place in each answer, and you never use lists. The traveller is planning a two-week trip by train "
    "through several European countries in spring, on a modest budget, and likes museums, markets, "
    "long walks and local food. They do not drive, and they prefer small hotels near the station."
)
QUESTIONS = ["Where should I start the trip?", "What should I eat there?", "Which museum is worth a morning?",
             "Where do I go next by train?", "What is a good day walk around there?"]  # fmt: skip
CITIES = ["Lisbon", "Vienna", "Prague", "Krakow", "Ghent", "Turin", "Lyon", "Bologna"]


def one_turn(
    session: requests.Session,
    base: str,
    messages: list[dict[str, str]],
    session_id: str | None,
    max_tokens: int,
) -> tuple[float, str, int]:
    """(TTFT from the job's stamps, the reply, prompt tokens taken from the session's cache) of one
    turn; the response cache is off for it, so every turn generates."""
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "cache": False}
    if session_id is not None:
        body["session_id"] = session_id
    job = session.post(f"{base}/v1/jobs", json=body, timeout=30).json()
    view = settled_view(session, base, job)
    if view["status"] != "finished":
        raise RuntimeError(f"turn ended {view['status']}: {view.get('error')}")
    stamps, usage = view["timestamps"], view["result"]["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return stamps["first_token"] - stamps["received"], view["result"]["text"], cached


def sessions(base: str, conversations: int = 6, turns: int = 5, max_tokens: int = 48) -> dict[str, Any]:
    """`conversations` chats of `turns` turns, each held twice side by side, one turn at a time: as a
    session (`session_id`: KV reuse) and without; TTFT per turn for both, and the turn-5 ratio."""
    client = requests.Session()
    ttft: dict[str, list[list[float]]] = {
        "reuse": [[] for _ in range(turns)],
        "cold": [[] for _ in range(turns)],
    }
    cached: list[list[int]] = [[] for _ in range(turns)]
    for index in range(conversations):
        start = [{"role": "system", "content": f"{SYSTEM} They start in {CITIES[index % len(CITIES)]}."}]
        chats = {mode: list(start) for mode in ttft}
        for turn in range(turns):
            # Alternate which goes first, so neither always follows the other.
            for mode in ("reuse", "cold") if (index + turn) % 2 == 0 else ("cold", "reuse"):
                chats[mode].append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
                session_id = f"bench-{index}" if mode == "reuse" else None
                seconds, text, reused = one_turn(client, base, chats[mode], session_id, max_tokens)
                chats[mode].append({"role": "assistant", "content": text})
                ttft[mode][turn].append(seconds)
                if mode == "reuse":
                    cached[turn].append(reused)
    p50 = {mode: [statistics.median(per_turn) for per_turn in values] for mode, values in ttft.items()}
    return {
        "conversations": conversations, "turns": turns, "max_tokens": max_tokens,
        "ttft_p50_seconds": p50, "cached_tokens_mean": [statistics.fmean(c) for c in cached],
        "last_turn_ttft_ratio": p50["reuse"][-1] / p50["cold"][-1],
        "targets": {"last_turn_ttft_ratio_max": 0.5},
    }  # fmt: skip


def print_sessions(figures: dict[str, Any]) -> None:
    print(f"sessions: {figures['conversations']} chats x {figures['turns']} turns, each with and without "
          f"session reuse, max_tokens {figures['max_tokens']}")  # fmt: skip
    for turn in range(figures["turns"]):
        reuse, cold = figures["ttft_p50_seconds"]["reuse"][turn], figures["ttft_p50_seconds"]["cold"][turn]
        print(f"  turn {turn + 1}: TTFT p50 reuse {reuse * 1000:7.1f} ms  without {cold * 1000:7.1f} ms  "
              f"(cached prompt tokens {figures['cached_tokens_mean'][turn]:.0f})")  # fmt: skip
    ratio = figures["last_turn_ttft_ratio"]
    print(f"  turn {figures['turns']} TTFT reuse / without = {ratio:.3f} (target <= 0.5)")


def print_replay(figures: dict[str, Any]) -> None:
    print(f"replay: {figures['requests']} requests, {figures['prompts_seen']} distinct prompts seen "
          f"(Zipf s={figures['zipf_exponent']}), {figures['client_threads']} clients, "
          f"max_tokens {figures['max_tokens']}, {figures['wall_seconds']:.0f} s")  # fmt: skip
    print(f"  hit rate {figures['hit_rate']:.1%} ({figures['hits']} hits, {figures['misses']} generated, "
          f"{figures['worker_hits']} answered by a worker without generating; target >= 70%)")  # fmt: skip
    for kind in ("hit", "miss", "worker_hit"):
        q = figures[f"{kind}_seconds"]
        if q:
            print(f"  {kind:10s} p50 {q['p50'] * 1000:8.1f} ms  p95 {q['p95'] * 1000:8.1f} ms")
    if figures["hit_p50_over_miss_p50"] is not None:
        print(f"  hit p50 / miss p50 = {figures['hit_p50_over_miss_p50']:.4f} (target <= 0.01)")
    print(f"  hits not byte-identical to a generated answer: {figures['hits_not_byte_identical']}; "
          f"prompts whose hits differ: {figures['prompts_with_differing_hits']}; "
          f"errors: {figures['errors']} {figures['first_errors']}")  # fmt: skip
    print(f"  prompts generated more than once (concurrent misses on different workers or batches): "
          f"{figures['prompts_generated_more_than_once']}, "
          f"of which differently (batch numerics): {figures['of_which_generated_differently']}")  # fmt: skip


@click.command()
@click.option("--requests", "count", default=1000, show_default=True)
@click.option("--prompts", "distinct", default=200, show_default=True, help="Distinct prompts.")
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--threads", default=4, show_default=True, help="Concurrent clients.")
@click.option("--zipf", "exponent", default=1.0, show_default=True, help="Zipf exponent of repeats.")
@click.option("--conversations", default=6, show_default=True, help="Five-turn chats of `sessions`.")
@click.option(
    "--section", "sections", multiple=True, default=("replay", "sessions"), show_default=True,
    type=click.Choice(["replay", "sessions"]), help="Sections to run.",
)  # fmt: skip
def main(
    count: int, distinct: int, max_tokens: int, threads: int, exponent: float, conversations: int,
    sections: tuple[str, ...],
) -> None:  # fmt: skip
    """Run each section against one stack; print and write the figures."""
    folder = Path(tempfile.mkdtemp(prefix="gptoss-cache-bench-"))
    record: dict[str, Any] = {"benchmark": "cache", "model": MODEL,
                              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    with stack(folder) as base:
        if "replay" in sections:
            record["replay"] = replay(base, count, distinct, max_tokens, threads, exponent)
            print_replay(record["replay"])
        if "sessions" in sections:
            record["sessions"] = sessions(base, conversations)
            print_sessions(record["sessions"])
    write_results("cache", record)


if __name__ == "__main__":
    main()
