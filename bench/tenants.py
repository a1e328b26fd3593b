"""`bench/serving.py --tenants`: fairness between tenants as a light tenant sees it. Our stack (as
`gptoss up` runs it, auth on, one API key per tenant); the light tenant's requests (a seeded Poisson
process of short prompts with short outputs) first alone, then the same requests at the same times
while a flooding tenant keeps more requests running than a batch holds (closed loop, each client
sending its next request as its last one ends). Prints and records the light tenant's TTFT and E2E
p50/p95 in both phases and the ratio flood / alone of its TTFT p95 (target ≤ 1.2), with the flooding
tenant's throughput."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from bench.latency import Outcome, Slo, percentile, poisson_arrivals, summarise
from bench.stack import Cluster, cpu_flags, write_results
from bench.traffic import ChatServer, Prompt, draw, open_loop, stream_chat
from shared import keys
from shared.apikeys import create_key
from shared.jobstore.record import JobRecord
from shared.jobstore.rqstore import job_key, queue_key

SHORT_PROMPT_TOKENS = 200
"""Both tenants send the data set's shorter prompts (at most this many tokens): a prompt of 2,000
tokens stalls every row of its batch while it is prefilled (seconds on a CPU), whoever's it is, which
no order of taking can help (chunked prefill would)."""


@dataclass
class TenantOutcome(Outcome):
    """An outcome with its job's id (from the chunks' `chatcmpl-<job>` ids) and, read from the job's
    record afterwards, the server's share of its TTFT: admission and routing (received → scheduled),
    waiting in the worker's queue for a slot (scheduled → started: what fair sharing decides) and
    then for its first token (started → first_token)."""

    routing: float | None = None
    slot_wait: float | None = None
    to_first_token: float | None = None

    @property
    def job(self) -> str | None:
        return (self.response_id or "").partition("-")[2] or None


TARGET = 1.2
"""The light tenant's TTFT p95 under the flood, at most this many times its value alone."""


def stream_as(server: ChatServer, prompt: Prompt, key: str, timeout: float = 900) -> TenantOutcome:
    """`prompt` as a streamed chat completion sent with API key `key`, timed chunk by chunk."""
    outcome = TenantOutcome(prompt.id, sent=time.perf_counter())
    stream_chat(server, prompt, timeout, key=key, outcome=outcome)
    return outcome


def read_stages(cluster: Cluster, outcomes: list[TenantOutcome]) -> None:
    """Each outcome's wait for a slot and for its first token, from its job's stamps."""
    for o in outcomes:
        meta = cluster.redis.hget(job_key(o.job), "meta") if o.job else None
        if meta is None:
            continue
        stamps = JobRecord.from_meta(json.loads(meta)).timestamps
        if stamps.received and stamps.scheduled:
            o.routing = stamps.scheduled - stamps.received
        if stamps.scheduled and stamps.started:
            o.slot_wait = stamps.started - stamps.scheduled
        if stamps.started and stamps.first_token:
            o.to_first_token = stamps.first_token - stamps.started


def stages(outcomes: list[TenantOutcome]) -> dict[str, dict[str, float | None]]:
    """p50 and p95 of routing, the wait for a slot and for the first token."""
    return {
        name: {q: percentile([v for o in outcomes if (v := getattr(o, name)) is not None], p)
               for q, p in (("p50", 0.5), ("p95", 0.95))}
        for name in ("routing", "slot_wait", "to_first_token")
    }  # fmt: skip


class Flood:
    """`clients` clients of one tenant, each sending its next prompt (in turn from `prompts`) as its
    last request ends, from `start()` until `stop()`."""

    def __init__(self, server: ChatServer, key: str, prompts: list[Prompt], clients: int):
        self._send = lambda p: stream_as(server, p, key)
        self._prompts, self._clients = prompts, clients
        self._stopping, self._lock = threading.Event(), threading.Lock()
        self._threads: list[threading.Thread] = []
        self._next = 0
        self.outcomes: list[TenantOutcome] = []

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self._clients)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """No new requests; returns once the running ones ended."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()

    def _client(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                prompt = self._prompts[self._next % len(self._prompts)]
                self._next += 1
            outcome = self._send(prompt)
            with self._lock:
                self.outcomes.append(outcome)


def saturated(cluster: Cluster, batch_size: int, timeout: float = 300) -> bool:
    """Until a worker runs a full batch and jobs still wait behind it (False after `timeout` s)."""
    queue = queue_key(keys.SINGLE_QUEUE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.redis.hlen(keys.RUNNING) >= batch_size and cluster.redis.llen(queue) > 0:
            return True
        time.sleep(0.2)
    return False


def light_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """What the record keeps of one phase's summary."""
    keep = ("requests", "failed", "errors", "ttft_s", "e2e_s", "itl_s", "output_tokens_per_second")
    return {k: summary[k] for k in keep}


def samples(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Every request of a phase, times from the phase's first send."""
    start = min((o.sent for o in outcomes), default=0.0)
    return [o.record(start) for o in outcomes]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f} ms"


def over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_tenants(
    model: str,
    data: list[Prompt],
    slo: Slo,
    *,
    batch_size: int,
    light_rate: float,
    light_requests: int,
    light_tokens: int,
    flood_clients: int,
    flood_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """Both phases against one stack, printed; the record written (bench/results/serving_tenants.json)."""
    short = [p for p in data if p.prompt_tokens <= SHORT_PROMPT_TOKENS] or data
    light = [replace(p, max_tokens=light_tokens) for p in draw(short, light_requests, seed)]
    shuffled = draw(short, len(short), seed + 1)
    heavy = [replace(p, max_tokens=min(p.max_tokens, flood_tokens)) for p in shuffled]
    times = poisson_arrivals(light_rate, light_requests, seed)
    env = {"GPTOSS_AUTH": "true", "GPTOSS_MODEL": model, "GPTOSS_MAX_BATCH_SIZE": str(batch_size),
           "GPTOSS_RATE_LIMIT_REQUESTS": "1000000", "GPTOSS_RATE_LIMIT_TOKENS": str(10**9)}  # fmt: skip
    if weights := os.environ.get("GPTOSS_TENANT_WEIGHTS"):
        env["GPTOSS_TENANT_WEIGHTS"] = weights
    flags = cpu_flags()
    print(f"tenants: {model}, batch {batch_size}, prompts ≤ {SHORT_PROMPT_TOKENS} tokens; light: "
          f"{light_requests} requests at {light_rate}/s, {light_tokens} tokens out; flood: {flood_clients} "
          f"clients, ≤ {flood_tokens} tokens out; {os.cpu_count()} cores {flags}", flush=True)  # fmt: skip
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-tenants-")), env, fsync="everysec")
    began = time.monotonic()
    try:
        cluster.start_all(300)
        light_key, _ = create_key(cluster.redis, "light")
        flood_key, _ = create_key(cluster.redis, "flood")
        extra = {"cache": False, "stream_options": {"include_usage": True}}
        server = ChatServer("ours", cluster.base, model, extra)
        for prompt in light[:2]:  # warm-up, not counted: the first loads what loads lazily
            stream_as(server, replace(prompt, max_tokens=4), light_key)
        send: Callable[[Prompt], Outcome] = lambda p: stream_as(server, p, light_key)  # noqa: E731
        alone = cast(list[TenantOutcome], open_loop(send, light, times))
        flood = Flood(server, flood_key, heavy, flood_clients)
        flood.start()
        full = saturated(cluster, batch_size)
        flood_began = time.perf_counter()
        under = cast(list[TenantOutcome], open_loop(send, light, times))
        flood.stop()
        read_stages(cluster, [*alone, *under])
    finally:
        cluster.stop()
    phases = {"alone": summarise(list[Outcome](alone), slo), "flood": summarise(list[Outcome](under), slo)}
    flooding = summarise([o for o in flood.outcomes if o.sent >= flood_began], slo)
    ratio = {q: over(phases["flood"]["ttft_s"][q], phases["alone"]["ttft_s"][q]) for q in ("p50", "p95")}
    for name, s in phases.items():
        ttft, e2e = s["ttft_s"], s["e2e_s"]
        waits = stages(alone if name == "alone" else under)
        print(f"light {name:<6} TTFT p50 {ms(ttft['p50'])}, p95 {ms(ttft['p95'])}; "
              f"E2E p50 {ms(e2e['p50'])}, p95 {ms(e2e['p95'])}; failed {s['failed']}; server side p50/p95: "
              + "; ".join(f"{k} {ms(v['p50'])} / {ms(v['p95'])}" for k, v in waits.items()))  # fmt: skip
    print(f"flood meanwhile: {flooding['requests']} requests, {flooding['output_tokens_per_second']:.1f} "
          f"tokens/s" + ("" if full else " (never a full batch with jobs waiting: not a flood)"))  # fmt: skip
    met = ratio["p95"] is not None and ratio["p95"] <= TARGET
    print("light TTFT under flood / alone: " + ", ".join(f"{q} {v:.2f}x" for q, v in ratio.items() if v)
          + f" (target p95 ≤ {TARGET}x: {'met' if met else 'not met'})")  # fmt: skip
    record = {
        "benchmark": "serving_tenants", "model": model, "batch_size": batch_size, "seed": seed,
        "tenant_weights": env.get("GPTOSS_TENANT_WEIGHTS", ""),
        "light": {"rate": light_rate, "requests": light_requests, "max_tokens": light_tokens,
                  "prompt_tokens_at_most": SHORT_PROMPT_TOKENS},
        "flood": {"clients": flood_clients, "max_tokens": flood_tokens, "saturated": full,
                  **light_figures(flooding)},
        "light_alone": {**light_figures(phases["alone"]), **stages(alone)},
        "light_under_flood": {**light_figures(phases["flood"]), **stages(under)},
        "light_ttft_ratio": ratio, "target_p95_ratio": TARGET, "met": met,
        "samples": {"alone": samples(alone), "flood": samples(under)},
        "cpu_count": os.cpu_count(), "cpu_flags": flags, "seconds": round(time.monotonic() - began, 1),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    write_results("serving_tenants", record)
    return record
