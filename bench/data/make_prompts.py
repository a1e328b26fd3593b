"""Writes bench/data/prompts.jsonl, the chat prompts bench/serving.py sends: short questions, tasks
with a little context, code to explain (Python standard library source) and documents to summarise
(standard library docstrings), so prompt lengths spread from about 20 to 1,900 tokens as counted by
the embedded model's tokenizer, skewed short as chat traffic is. Each line has the messages, a
target output length (`max_tokens`) and the prompt's token count. Seeded: the same Python and
tokenizer write the same file; the committed file is the data, this script how it was made.

    .venv/bin/python bench/data/make_prompts.py [--count 200]
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "prompts.jsonl"
SEED = 19
MAX_PROMPT_TOKENS = 1900
"""Under the server's long-prompt mark (2,000 tokens) with the chat template included."""

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in plain language and keep answers short.",
    "You are a senior software engineer who reviews code carefully and explains it to colleagues.",
]

QUESTIONS = [
    "Why is the sky blue?", "How do vaccines train the immune system?",
    "What is the difference between weather and climate?", "How does a refrigerator keep food cold?",
    "Explain how compound interest works with an example.", "What causes the seasons on Earth?",
    "Why do cats purr?", "How do noise-cancelling headphones work?",
    "What is the difference between a virus and a bacterium?", "How does GPS know where I am?",
    "Give me three tips for sleeping better.", "What is a black hole?",
    "How do I make a simple tomato sauce?", "What is the capital of Australia and why was it chosen?",
    "Explain recursion to a ten-year-old.", "What is the difference between TCP and UDP?",
    "Why do leaves change colour in autumn?", "How does a bill become a law in the United States?",
    "What are the main causes of inflation?", "How do I start learning to play the guitar?",
    "What is photosynthesis?", "Why is the ocean salty?", "How do airplanes stay in the air?",
    "What should I pack for a three-day hiking trip?", "Explain what a hash table is.",
    "What is the Pythagorean theorem?", "How can I be more productive when working from home?",
    "What is the difference between baking soda and baking powder?", "Why do we dream?",
    "How does a solar panel produce electricity?", "What were the causes of the First World War?",
    "How do I write a good cover letter?", "What is machine learning in simple terms?",
    "Why do onions make people cry?", "How do bees make honey?", "What is a prime number?",
    "Explain the rules of chess briefly.", "How does the stock market work?",
    "What is the greenhouse effect?", "How can I improve my public speaking?",
]  # fmt: skip

TASKS = [
    "Write a polite email to my landlord asking to fix {thing} before {day}.",
    "Write a short poem about {topic}.", "Give me a packing list for a week-long trip to {place}.",
    "Summarise the pros and cons of {topic} in a short table.",
    "Write a product description for {thing} for an online shop.",
    "Plan a three-day itinerary for a first visit to {place}.",
    "Write a short story for children about {topic}.",
    "Draft a meeting agenda for a team discussion about {topic}.",
    "Explain {topic} as if I were a beginner, with one concrete example.",
    "Write a tweet announcing {thing}, friendly and under 280 characters.",
    "Suggest five names for a small business that sells {thing}.",
    "Write a recipe that uses {thing} and takes under thirty minutes.",
]  # fmt: skip
FILLS = {
    "thing": ["the broken heater", "a leaking kitchen tap", "handmade ceramic mugs", "a used bicycle",
              "fresh sourdough bread", "a new note-taking app", "the front door lock", "spinach"],
    "day": ["Friday", "the end of the month", "next Monday"],
    "topic": ["remote work", "electric cars", "a lost dragon", "learning a second language",
              "the water cycle", "city gardening", "a robot who learns to paint", "saving for retirement"],
    "place": ["Lisbon", "Kyoto", "Mexico City", "Edinburgh", "Cape Town", "Montreal"],
}  # fmt: skip
CONTEXT = [
    "Some context: I have about two hours a day for this.",
    "Keep the tone warm but professional.",
    "My budget is limited, so please keep costs low and say where I could save money.",
    "I am a complete beginner, so avoid jargon.",
    "This is for a school project, so accuracy matters more than style.",
]

CODE_MODULES = ["textwrap", "json.decoder", "argparse", "shlex", "difflib", "csv", "fractions", "heapq",
                "calendar", "string", "statistics", "ipaddress", "configparser", "tokenize"]  # fmt: skip
CODE_ASKS = [
    "Explain what this Python code does, step by step:",
    "Review this Python code. Point out bugs, unclear names and possible improvements:",
    "Write unit tests for the following Python code:",
    "Summarise what this module does and how its parts fit together:",
]
DOC_MODULES = ["collections", "itertools", "functools", "os", "pathlib", "datetime", "random",
               "re", "subprocess", "threading", "logging", "email.message", "http.client"]  # fmt: skip
DOC_ASKS = [
    "Summarise the following documentation in five bullet points:",
    "Read this documentation and list the three most useful functions it describes, with why:",
    "Turn this documentation into a short tutorial for a newcomer:",
]


def log_uniform(rng: random.Random, low: float, high: float) -> int:
    """An integer spread evenly in log scale between `low` and `high`."""
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def module_source(name: str) -> list[str]:
    """The lines of a standard-library module's source."""
    return inspect.getsource(importlib.import_module(name)).splitlines()


def module_docs(name: str) -> list[str]:
    """The docstrings of a module and its public members, as paragraphs of plain English."""
    module = importlib.import_module(name)
    paragraphs = [inspect.getdoc(module) or ""]
    for member_name, member in inspect.getmembers(module):
        doc = inspect.getdoc(member) if not member_name.startswith("_") else None
        if doc and callable(member):
            paragraphs.append(f"{member_name}: {doc}")
    return [line for p in paragraphs for line in (p.splitlines() + [""])]


def fitted(head: str, lines: list[str], target: int, count: Callable[[str], int]) -> str:
    """`head` followed by as many of `lines` as keep the prompt within `target` tokens."""
    low, high = 1, len(lines)
    while low < high:  # the most lines whose prompt fits `target`
        mid = (low + high + 1) // 2
        if count(head + "\n" + "\n".join(lines[:mid])) <= target:
            low = mid
        else:
            high = mid - 1
    return head + "\n" + "\n".join(lines[:low])


def prompt(rng: random.Random, count: Callable[[str], int]) -> tuple[str, str, int]:
    """One prompt's kind, its user message and its target output length."""
    kind = rng.choices(["question", "task", "code", "document"], weights=[40, 25, 20, 15])[0]
    if kind == "question":
        return kind, rng.choice(QUESTIONS), log_uniform(rng, 32, 256)
    if kind == "task":
        text = rng.choice(TASKS).format(**{k: rng.choice(v) for k, v in FILLS.items()})
        extra = rng.sample(CONTEXT, rng.randint(0, 3))
        return kind, " ".join([text, *extra]), log_uniform(rng, 64, 256)
    name = rng.choice(CODE_MODULES if kind == "code" else DOC_MODULES)
    lines = module_source(name) if kind == "code" else module_docs(name)
    target = log_uniform(rng, 150, MAX_PROMPT_TOKENS - 60)
    start = rng.randrange(len(lines))
    lines = lines[start:] + lines[:start]  # from a random line on, wrapping round
    ask = rng.choice(CODE_ASKS if kind == "code" else DOC_ASKS)
    body = fitted(ask + ("\n```python" if kind == "code" else "\n"), lines, target, count)
    body += "\n```" if kind == "code" else ""
    return kind, body, log_uniform(rng, 64, 256)


def build(count: int, seed: int = SEED) -> list[dict[str, Any]]:
    """`count` prompts drawn with `seed`."""
    from transformers import AutoTokenizer

    from shared.registry import model_spec
    from shared.settings import Settings

    folder = model_spec("smollm2-135m").directory(Settings().cache_dir)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(folder))

    def tokens(messages: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])  # fmt: skip

    rng, rows = random.Random(seed), []
    for i in range(count):
        system = rng.choice([None, *SYSTEMS])
        head = [{"role": "system", "content": system}] if system else []

        def length(text: str, head: list[dict[str, str]] = head) -> int:
            return tokens([*head, {"role": "user", "content": text}])

        kind, text, max_tokens = prompt(rng, length)
        messages = [*head, {"role": "user", "content": text}]
        rows.append({"id": f"p{i:03d}", "kind": kind, "messages": messages, "max_tokens": max_tokens,
                     "prompt_tokens": tokens(messages)})  # fmt: skip
    return rows


@click.command()
@click.option("--count", default=200, show_default=True, help="Prompts to write")
def main(count: int) -> None:
    rows = build(count)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    lengths = sorted(r["prompt_tokens"] for r in rows)
    outputs = sorted(r["max_tokens"] for r in rows)
    print(f"wrote {len(rows)} prompts to {OUT}: prompt tokens min {lengths[0]}, median "
          f"{lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"max_tokens median {outputs[len(outputs) // 2]}")  # fmt: skip


if __name__ == "__main__":
    main()
