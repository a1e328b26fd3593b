"""CUDA-only paths, marked `gpu`: scripts/device-check runs them on a lent GPU; on a machine without
one they are skipped (the CPU suite covers the same code on the CPU where it can run there).

- `device_map="auto"` (a gpu-multi worker's pipeline placement) answers as one device does;
- NCCL tensor parallel (two ranks, one per GPU: NCCL refuses two ranks on one GPU);
- a real CUDA out-of-memory in an oversized batch: only the rows that must, wait or fail, and the
  worker goes on (tests/test_out_of_memory.py holds the same policy on the CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from redis import Redis

from shared import keys
from shared.contract import ChatMessage, JobRequest
from shared.jobstore.rqstore import fetch_job
from shared.registry import model_spec
from shared.settings import Settings
from tests.conftest import work
from tests.test_poison import enqueue
from tests.test_tensor_parallel import test_two_rank_worker_answers_like_one_process as two_ranks
from workers import session as session_module
from workers.model_store import prepare
from workers.placement import Placement
from workers.runtime import ModelRuntime

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/device-check runs it)"
    ),
]

MEMORY_LIMIT = 1 << 30
"""Bytes of the GPU this test process may allocate in the out-of-memory test (a real CUDA limit)."""


@pytest.fixture(scope="module")
def tiny_models() -> Settings:
    """tiny-gpt-oss prepared (trained once per machine); not the CPU default model, whose GGUF wheel
    the device image lacks."""
    settings = Settings()
    prepare(model_spec("tiny-gpt-oss"), settings.cache_dir)
    return settings


def test_pipeline_placement_answers_as_one_device_does(tiny_models: Settings) -> None:
    spec = model_spec("tiny-gpt-oss")
    one = ModelRuntime.load(spec, tiny_models, Placement("device", "cuda:0"))
    spread = ModelRuntime.load(spec, tiny_models, Placement("pipeline", "cuda:0"))
    assert spread.model.device.type == "cuda"  # device_map="auto" placed it on the GPU
    request = JobRequest(
        messages=[ChatMessage(role="user", content="Say hello.")], max_tokens=24, temperature=0
    )
    assert spread.generate(request).token_ids == one.generate(request).token_ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL runs one rank per GPU: needs 2 GPUs")
def test_two_nccl_ranks_answer_like_one_process(redis, redis_url, tiny_models, processes) -> None:  # type: ignore[no-untyped-def]
    single = ModelRuntime.load(model_spec("tiny-gpt-oss"), tiny_models)
    two_ranks(redis, redis_url, tiny_models, processes, single)  # on GPUs the group is NCCL


def test_an_oversized_batch_out_of_memory_fails_or_defers_only_what_it_must(
    settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen: list[bool] = []
    recognise = session_module.is_out_of_memory

    def observed(error: BaseException) -> bool:
        seen.append(recognise(error))
        return seen[-1]

    monkeypatch.setattr(session_module, "is_out_of_memory", observed)
    config = settings(model="gpt-oss-20b-random-mini", device="cuda:0", ignore_eos=True, prefill_chunk=0,
                      max_batch_size=16, observability=False)  # fmt: skip
    runtime = ModelRuntime.load(model_spec(config.model), config, Placement("device", "cuda:0"))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(MEMORY_LIMIT / total, 0)
    try:
        long = " ".join(["river mountain ocean"] * 1100)  # ~3,300 tokens: eager attention, 16 rows
        ids = [enqueue(redis, body(f"{i} {long}")) for i in range(16)]
        after = enqueue(redis, body("a short one"))
        work(config, redis, runtime, keys.SINGLE_QUEUE)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert any(seen), "the batch never ran out of memory: the test proves nothing"
    jobs = [fetch_job(i, redis) for i in ids]
    statuses = [(j.get_status(), (j.meta.get("error") or {}).get("code")) for j in jobs]
    assert all(s in (("finished", None), ("failed", "out_of_memory")) for s in statuses), statuses
    assert ("finished", None) in statuses
    assert fetch_job(after, redis).get_status() == "finished"  # the worker went on
    assert redis.hlen(keys.RUNNING) == 0


def body(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
