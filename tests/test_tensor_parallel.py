"""Placement, and a 2-rank tensor-parallel worker (torchrun, CPU, gloo) answering a job with the same
tokens as the single-process worker."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from shared import keys
from shared.contract import ChatMessage, JobRequest
from shared.jobstore.rqstore import fetch_job, open_queue
from shared.registry import model_spec
from tests.conftest import Processes, process_env, wait_for
from workers.placement import place, wants_torchrun
from workers.runtime import ModelRuntime
from workers.tiny_model import CONVERSATIONS


def test_single_worker_pins_one_device() -> None:
    spec = model_spec("gpt-oss-20b")
    assert place(keys.SINGLE_QUEUE, spec, "cuda:3", 8).device == "cuda:3"
    assert place(keys.SINGLE_QUEUE, spec, None, 8).device == "cuda:0"
    assert place(keys.SINGLE_QUEUE, spec, None, 0).device == "cpu"
    assert place(keys.SINGLE_QUEUE, spec, None, 8).kind == "device"


def test_multi_worker_spreads_over_its_gpus() -> None:
    twenty, big = model_spec("20b"), model_spec("120b")
    assert place(keys.MULTI_QUEUE, twenty, None, 4).kind == "pipeline"
    assert not wants_torchrun(keys.MULTI_QUEUE, twenty, 4, 1)
    assert wants_torchrun(keys.MULTI_QUEUE, big, 4, 1)
    assert not wants_torchrun(keys.MULTI_QUEUE, big, 4, 4)  # already under torchrun
    assert not wants_torchrun(keys.SINGLE_QUEUE, big, 4, 1)
    ranked = place(keys.MULTI_QUEUE, big, None, 4, world_size=4, rank=2, local_rank=2)
    assert (ranked.kind, ranked.device, ranked.world_size, ranked.rank) == ("tensor-parallel", "cuda:2", 4, 2)
    assert place(keys.MULTI_QUEUE, big, None, 0, world_size=2, rank=1, local_rank=1).device == "cpu"


@pytest.fixture(scope="module")
def single(prepared_models) -> ModelRuntime:  # type: ignore[no-untyped-def]
    return ModelRuntime.load(model_spec("tiny-gpt-oss"), prepared_models)


def test_two_rank_worker_answers_like_one_process(
    redis: Redis, redis_url: str, prepared_models, processes: Processes, single: ModelRuntime
) -> None:  # type: ignore[no-untyped-def]
    env = process_env(
        GPTOSS_REDIS_URL=redis_url,
        GPTOSS_MODEL="tiny-gpt-oss",
        GPTOSS_WORKER_QUEUE=keys.MULTI_QUEUE,
        GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_TORCH_THREADS=1,
        GPTOSS_WORKER_METRICS_PORT=0,
        GPTOSS_OBSERVABILITY="false",
    )
    ranks = processes.start(
        "torchrun", ["torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "workers"], env
    )
    queue = open_queue(keys.MULTI_QUEUE, redis)
    question = CONVERSATIONS[4][0]
    requests = [
        JobRequest(messages=[ChatMessage(role="user", content=question)], max_tokens=60, temperature=0),
        JobRequest(prompt="Say something", max_tokens=60, temperature=0.8, seed=7),
    ]
    jobs = [
        queue.enqueue(
            keys.GENERATE_FUNC, r.model_dump(mode="json"), meta={"timestamps": {"received": time.time()}}
        )
        for r in requests
    ]

    def ended() -> bool:
        assert ranks.poll() is None, (processes.logs / "torchrun.log").read_text()[-3000:]
        return all(fetch_job(j.id, redis).get_status() in ("finished", "failed") for j in jobs)

    wait_for(ended, 240, "the tensor-parallel worker to answer both jobs", interval=0.3)
    log = (processes.logs / "torchrun.log").read_text()
    assert log.count('"placement": "tensor-parallel"') == 2, log[-3000:]  # both ranks loaded sharded
    assert log.count('"expert_parallel": 2') == 2  # each rank holds 2 of tiny-gpt-oss's 4 experts
    for job, request in zip(jobs, requests, strict=True):
        result = fetch_job(job.id, redis).return_value()
        assert result is not None and result["queue"] == keys.MULTI_QUEUE, log[-3000:]
        alone = single.generate(request)
        assert (result["text"], result["reasoning"]) == (alone.text, alone.reasoning)
        assert result["usage"]["completion_tokens"] == alone.completion_tokens
