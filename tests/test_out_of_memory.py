"""Out of memory inside a batch: the rows that do not fit wait in the session until a row leaves,
a row that does not fit even alone fails with `out_of_memory`, and the worker goes on. The device
is tiny-gpt-oss on the CPU with room for two rows: its forward pass raises torch's own
OutOfMemoryError past that (tests/test_gpu.py runs the real thing on a GPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from redis import Redis
from rq.registry import FailedJobRegistry

from shared import keys
from shared.contract import JobRequest
from shared.jobstore.rqstore import fetch_job
from tests.conftest import QUESTIONS, TINY, work
from tests.test_poison import Batches, body, enqueue
from workers.batch import DecodeBatch
from workers.memory import is_out_of_memory

ROOM = 2
"""Rows the pretend device holds."""

TOO_LONG = 400
"""Prompt tokens that do not fit even alone."""


def small_device(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every forward pass that would hold more than ROOM rows, or a prompt over TOO_LONG tokens,
    raises torch.OutOfMemoryError; the rows held at each refusal."""
    forward, refused = DecodeBatch._forward, []

    def fitting(batch: DecodeBatch, ids: torch.Tensor, mask: Any, positions: Any, cache: Any) -> Any:
        joining = ids.shape[0] if cache is not batch._cache else 0
        held = len(batch.rows) + joining
        if held > ROOM or ids.shape[1] > TOO_LONG:
            refused.append(held)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(batch, ids, mask, positions, cache)

    monkeypatch.setattr(DecodeBatch, "_forward", fitting)
    return refused


def test_out_of_memory_errors_are_recognised() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_rows_that_do_not_fit_wait_for_room_and_finish(settings, redis: Redis, runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    refused = small_device(monkeypatch)
    batches = Batches(monkeypatch)
    payloads = [body(topic) for topic in QUESTIONS[:5]]
    alone = [runtime.run(JobRequest.model_validate(p)).token_ids for p in payloads]
    ids = [enqueue(redis, p) for p in payloads]
    work(settings(model=TINY, observability=False, max_batch_size=8), redis, runtime, keys.SINGLE_QUEUE)
    assert refused, "the batch never ran out of memory: the test proves nothing"
    jobs = [fetch_job(i, redis) for i in ids]
    assert [j.get_status() for j in jobs] == ["finished"] * len(ids)
    # Each made the very tokens it makes alone, and had one result.
    assert [tuple(batches.rows[i].completion.token_ids) for i in ids] == alone
    assert all(len(redis.xrange(f"rq:results:{i}")) == 1 for i in ids)
    assert all(j.meta.get("retries", 0) == 0 for j in jobs)  # none went back to a queue
    assert redis.hlen(keys.RUNNING) == 0


def test_a_row_too_big_even_alone_fails_and_the_worker_goes_on(  # type: ignore[no-untyped-def]
    settings, redis: Redis, runtime, monkeypatch
) -> None:
    small_device(monkeypatch)
    huge = enqueue(redis, body(" ".join(["a very long topic"] * 120)))
    after = [enqueue(redis, body(topic)) for topic in QUESTIONS[:3]]
    work(settings(model=TINY, observability=False, max_batch_size=8), redis, runtime, keys.SINGLE_QUEUE)
    failed = fetch_job(huge, redis)
    assert failed.get_status() == "failed"
    assert failed.meta["error"]["code"] == "out_of_memory"
    assert FailedJobRegistry(keys.SINGLE_QUEUE, connection=redis).get_job_ids() == [huge]
    assert [fetch_job(i, redis).get_status() for i in after] == ["finished"] * 3
    assert redis.hlen(keys.RUNNING) == 0
