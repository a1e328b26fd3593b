"""Poison isolation: a row that fails in a batched prefill or decode step is retried alone before its
batch mates are failed, so only the row that fails alone fails and its mates finish with the output
they have alone. The poison is a sampler that raises for one row inside the shared forward pass;
the model is tiny-gpt-oss in fp32, whose batched greedy output equals its single output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from redis import Redis
from rq.registry import FailedJobRegistry

from shared import keys
from shared.contract import JobRequest
from shared.jobstore.rqstore import fetch_job, open_queue
from shared.settings import Settings
from tests.conftest import QUESTIONS, TINY, work
from workers import sampling
from workers.batch import DecodeBatch, Row
from workers.completion import Generation
from workers.runtime import ModelRuntime

POISON_TEMPERATURE = 0.123
"""The poisoned request's temperature: its sampler is the one that raises."""


def body(topic: str, **extra: object) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Write one sentence about {topic}."}]
    return {"messages": messages, "max_tokens": 12, "temperature": 0, **extra}


def enqueue(redis: Redis, payload: dict[str, Any]) -> str:
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    return queue.enqueue(keys.GENERATE_FUNC, payload, result_ttl=600, failure_ttl=600).id


def poison(monkeypatch: pytest.MonkeyPatch, fails: Callable[[int], bool]) -> None:
    """The poisoned row's sampler raises on its n-th draw when `fails(n)` (the others draw as usual)."""
    sample = sampling._sample
    draws = 0

    def sample_or_fail(logits: torch.Tensor, sampler: sampling.Sampler) -> torch.Tensor:
        nonlocal draws
        if sampler.temperature == POISON_TEMPERATURE:
            draws += 1
            if fails(draws):
                raise RuntimeError("the poisoned row's sampler failed")
        return sample(logits, sampler)

    monkeypatch.setattr(sampling, "_sample", sample_or_fail)


class Batches:
    """What the worker's batches did: the rows of each join, the rows of each step and whether it
    raised, and every row that joined, by job id."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.joins: list[int] = []
        self.steps: list[tuple[int, bool]] = []
        self.rows: dict[str, Row] = {}
        join, step = DecodeBatch.join, DecodeBatch.step

        def joining(batch: DecodeBatch, rows: list[Row]) -> None:
            self.joins.append(len(rows))
            self.rows.update((r.key, r) for r in rows)
            join(batch, rows)

        def stepping(batch: DecodeBatch) -> None:
            rows = len(batch.rows)
            try:
                step(batch)
            except Exception:
                self.steps.append((rows, True))
                raise
            self.steps.append((rows, False))

        monkeypatch.setattr(DecodeBatch, "join", joining)
        monkeypatch.setattr(DecodeBatch, "step", stepping)


def run_with_poison(
    settings: Callable[..., Settings], redis: Redis, runtime: ModelRuntime
) -> tuple[str, list[str], list[Generation]]:
    """Three ordinary jobs and a poisoned one, queued together and run by one batching worker: the
    poisoned job's id, the others' ids and what each of them generates alone."""
    mates = [body(topic) for topic in QUESTIONS[:3]]
    alone = [runtime.run(JobRequest.model_validate(b)) for b in mates]
    ids = [enqueue(redis, b) for b in mates[:2]]
    poisoned = enqueue(redis, body("a poisoned well", temperature=POISON_TEMPERATURE, seed=7))
    ids.append(enqueue(redis, mates[2]))
    config = settings(model=TINY, observability=False, max_batch_size=8)
    work(config, redis, runtime, keys.SINGLE_QUEUE)
    return poisoned, ids, alone


def assert_fails_alone(
    redis: Redis, batches: Batches, poisoned: str, mates: list[str], alone: list[Generation]
) -> None:
    jobs = [fetch_job(i, redis) for i in mates]
    assert [j.get_status() for j in jobs] == ["finished"] * len(mates)
    # The very tokens each generates alone (tiny-gpt-oss's text is often empty: its tokens say more).
    assert [tuple(batches.rows[i].completion.token_ids) for i in mates] == [g.token_ids for g in alone]
    assert [j.return_value()["text"] for j in jobs] == [g.text for g in alone]
    assert all(len(redis.xrange(f"rq:results:{i}")) == 1 for i in mates)
    failed = fetch_job(poisoned, redis)
    assert failed.get_status() == "failed" and failed.meta["error"]["code"] == "generation_failed"
    assert FailedJobRegistry(keys.SINGLE_QUEUE, connection=redis).get_job_ids() == [poisoned]
    assert redis.hlen(keys.RUNNING) == 0


def test_a_row_that_fails_a_shared_prefill_fails_alone(
    settings: Callable[..., Settings],
    redis: Redis,
    runtime: ModelRuntime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poison(monkeypatch, lambda draw: True)  # its very first token cannot be drawn
    batches = Batches(monkeypatch)
    poisoned, mates, alone = run_with_poison(settings, redis, runtime)
    # The four were prefilled together, which failed; then each alone, where only the poison failed.
    assert batches.joins == [4, 1, 1, 1, 1]
    assert_fails_alone(redis, batches, poisoned, mates, alone)


def test_a_row_that_fails_a_shared_decode_step_fails_alone(
    settings: Callable[..., Settings],
    redis: Redis,
    runtime: ModelRuntime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poison(monkeypatch, lambda draw: draw >= 3)  # its first token and one step go well, then no more
    batches = Batches(monkeypatch)
    poisoned, mates, alone = run_with_poison(settings, redis, runtime)
    assert batches.joins[0] == 4 and batches.steps[:2] == [(4, False), (4, True)]  # the second failed
    assert batches.joins[1:] == [1, 1, 1, 1]  # each joined again alone, with the tokens it had
    assert batches.steps[2] == (3, False)  # the mates decode on together
    assert_fails_alone(redis, batches, poisoned, mates, alone)
