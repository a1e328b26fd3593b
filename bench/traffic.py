"""The traffic bench/serving.py sends: the shipped chat prompts, one streamed chat completion read
chunk by chunk as an OpenAI client reads it, and the two ways of sending many: open loop (requests
sent at set times, e.g. Poisson arrivals, whatever the server's state) and closed loop (N clients,
each sending its next request when its last one ended)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.latency import Outcome

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    """One chat request of the data set: its messages and its target output length."""

    id: str
    messages: list[dict[str, str]]
    max_tokens: int
    prompt_tokens: int


def load_prompts(path: Path = PROMPTS) -> list[Prompt]:
    """Every prompt of a JSONL file written by bench/data/make_prompts.py."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Prompt(r["id"], r["messages"], r["max_tokens"], r["prompt_tokens"]) for r in rows]


def draw(prompts: list[Prompt], count: int, seed: int) -> list[Prompt]:
    """`count` prompts drawn with `seed`: without repeats while the data set lasts."""
    rng = random.Random(seed)
    if count <= len(prompts):
        return rng.sample(prompts, count)
    return rng.sample(prompts, len(prompts)) + rng.choices(prompts, k=count - len(prompts))


@dataclass(frozen=True)
class ChatServer:
    """Where to send chat completions, the model name to ask for, and fields only this server takes
    (ours: `cache: false` and `stream_options`; transformers serve refuses both)."""

    name: str
    base: str
    model: str
    extra: dict[str, Any]

    def body(self, prompt: Prompt) -> dict[str, Any]:
        return {"model": self.model, "messages": prompt.messages, "max_tokens": prompt.max_tokens,
                "temperature": 0, "stream": True, **self.extra}  # fmt: skip


def sse_data(lines: Iterator[Any]) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent Events body, each as its line arrives."""
    for line in lines:
        if isinstance(line, str) and line.startswith("data:"):
            yield line[5:].strip()


def read_chunk(outcome: Outcome, payload: str, now: float) -> bool:
    """Take one chunk of an OpenAI chat stream into `outcome` (arrived at `now`); False at its end."""
    if payload == "[DONE]":
        return False
    chunk = json.loads(payload)
    if outcome.response_id is None and chunk.get("id"):
        outcome.response_id = str(chunk["id"])
    if "error" in chunk:
        error = chunk["error"]
        outcome.error = str(error.get("code") or error.get("message") if isinstance(error, dict) else error)
        return False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content"):
            outcome.chunks.append(now)
    if usage := chunk.get("usage"):
        outcome.output_tokens, outcome.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    return True


def stream_chat(
    server: ChatServer,
    prompt: Prompt,
    timeout: float = 900,
    key: str | None = None,
    outcome: Outcome | None = None,
) -> Outcome:
    """Send `prompt` as a streamed chat completion (with API key `key`, if given) and read it to its
    end, timing each chunk into `outcome` (a new one unless given)."""
    if outcome is None:
        outcome = Outcome(prompt.id, sent=time.perf_counter())
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    try:
        with requests.post(f"{server.base}/v1/chat/completions", json=server.body(prompt), stream=True,
                           headers=headers, timeout=timeout) as answer:  # fmt: skip
            if answer.status_code != 200:
                outcome.error = f"HTTP {answer.status_code}"
                return outcome
            for payload in sse_data(answer.iter_lines(decode_unicode=True)):
                if not read_chunk(outcome, payload, time.perf_counter()):
                    break
    except (requests.RequestException, ValueError) as exc:
        outcome.error = type(exc).__name__
    outcome.ended = time.perf_counter()
    return outcome


def open_loop(send: Callable[[Prompt], Outcome], prompts: list[Prompt], times: list[float]) -> list[Outcome]:
    """Send `prompts[i]` at `times[i]` seconds from now, each on its own thread, however many are
    still running; every outcome once all ended."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = []
        for prompt, at in zip(prompts, times, strict=True):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, prompt))
        return [f.result() for f in futures]


def closed_loop(send: Callable[[Prompt], Outcome], prompts: list[Prompt], clients: int) -> list[Outcome]:
    """`clients` clients, each sending the next of `prompts` when its last request ended."""
    queue, lock, outcomes = iter(prompts), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                prompt = next(queue, None)
            if prompt is None:
                return
            outcome = send(prompt)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes, key=lambda o: o.sent)
