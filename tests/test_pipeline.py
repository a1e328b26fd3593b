"""API → scheduler → worker in one test process: a real Redis, real RQ workers, tiny gpt-oss (harmony)."""

from __future__ import annotations

import os
import time

import pytest
from redis import Redis
from rq.registry import FailedJobRegistry, StartedJobRegistry

from api import create_app
from scheduler.loop import Scheduler
from scheduler.tokens import PromptCounter
from shared import keys
from shared.heartbeat import WorkerBeat, publish
from shared.jobstore.intake import Intake
from shared.jobstore.rqstore import fetch_job, open_queue
from tests.conftest import schedule_all, work

MODEL = "tiny-gpt-oss"


@pytest.fixture
def stack(redis: Redis, settings, runtime):  # type: ignore[no-untyped-def]
    # Harmony's system message alone is about 55 tokens: a short chat stays under 100.
    config = settings(model=MODEL, multi_gpu_threshold=100, heartbeat_interval=0.2)
    app = create_app(config, redis).test_client()
    scheduler = Scheduler(config, redis, PromptCounter(config.cache_dir))
    # The in-process workers run in burst mode after scheduling; their heartbeats say they live.
    for queue in keys.WORKER_QUEUES:
        beat = WorkerBeat(name=f"test-{queue}", queue=queue, model=MODEL, device="cpu", state="idle",
                          pid=os.getpid(), host="test", at=time.time())  # fmt: skip
        publish(redis, keys.worker_heartbeat(beat.name), beat, 600)
    return config, app, scheduler


def test_job_travels_to_single_queue_and_finishes(stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    job_id = app.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 5, "temperature": 0}).get_json()["id"]
    assert schedule_all(scheduler, redis) == 1
    view = app.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "scheduled"
    assert view["route"]["queue"] == keys.SINGLE_QUEUE and view["route"]["reason"] == "within_threshold"
    assert open_queue(keys.SINGLE_QUEUE, redis).job_ids == [job_id]  # the same job id moved

    worker = work(config, redis, runtime, keys.SINGLE_QUEUE)
    view = app.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "finished", view
    result = view["result"]
    assert result["queue"] == keys.SINGLE_QUEUE and result["worker"] == worker.name
    assert result["usage"]["completion_tokens"] == 5 and result["finish_reason"] == "length"
    assert result["usage"]["prompt_tokens"] == view["route"]["prompt_tokens"]
    stamps = view["timestamps"]
    order = ["received", "scheduled", "started", "first_token", "finished"]
    assert [stamps[s] for s in order] == sorted(stamps[s] for s in order)
    assert StartedJobRegistry(keys.SINGLE_QUEUE, connection=redis).count == 0


def test_a_request_renders_its_prompt_at_most_twice(stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    """The API counts the prompt once (the count travels in the job's record, so the scheduler does
    not count again) and the worker renders it once for its ids."""
    from shared.prompts import renders

    config, app, scheduler = stack
    body = {"messages": [{"role": "user", "content": "Count me once"}], "max_tokens": 3, "temperature": 0}
    before = renders()
    job_id = app.post("/v1/jobs", json=body).get_json()["id"]
    assert renders() - before == 1  # the API's count
    schedule_all(scheduler, redis)
    assert renders() - before == 1  # the scheduler routed on the record's count
    work(config, redis, runtime, keys.SINGLE_QUEUE)
    view = app.get(f"/v1/jobs/{job_id}").get_json()
    assert (
        view["status"] == "finished"
        and view["route"]["prompt_tokens"] == view["result"]["usage"]["prompt_tokens"]
    )
    assert renders() - before <= 2


def test_greedy_generation_is_repeatable(stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 6, "temperature": 0}
    ids = [app.post("/v1/jobs", json=body).get_json()["id"] for _ in range(2)]
    schedule_all(scheduler, redis)
    work(config, redis, runtime, keys.SINGLE_QUEUE)
    texts = [app.get(f"/v1/jobs/{i}").get_json()["result"]["text"] for i in ids]
    assert texts[0] == texts[1]


def test_long_prompt_goes_to_multi(stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    job_id = app.post("/v1/jobs", json={"prompt": "word " * 150, "max_tokens": 2}).get_json()["id"]
    schedule_all(scheduler, redis)
    work(config, redis, runtime, keys.MULTI_QUEUE)
    view = app.get(f"/v1/jobs/{job_id}").get_json()
    assert view["route"]["queue"] == keys.MULTI_QUEUE and view["route"]["reason"] == "over_threshold"
    assert view["route"]["prompt_tokens"] > 100
    assert view["result"]["queue"] == keys.MULTI_QUEUE


def test_context_overflow_is_refused_at_submission(stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    response = app.post("/v1/jobs", json={"prompt": "word " * 200, "max_tokens": 4000})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert "lower max_tokens" in error["message"] and error["details"][0]["loc"] == ["max_tokens"]
    response = app.post("/v1/jobs", json={"prompt": "word " * 5000, "max_tokens": 10})
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "prompt_too_long"
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0


def test_context_overflow_is_rejected_by_the_scheduler(stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    # Past the API's check (a client enqueueing by itself): the scheduler still refuses it.
    payload = {"prompt": "word " * 200, "max_tokens": 4000, "model": MODEL}
    job_id = open_queue(keys.INCOMING_QUEUE, redis).enqueue(keys.GENERATE_FUNC, payload).id
    schedule_all(scheduler, redis)
    view = app.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "rejected"
    assert view["error"]["code"] == "context_exceeded"
    assert "max_tokens" in view["error"]["message"]
    assert open_queue(keys.SINGLE_QUEUE, redis).count == 0
    assert redis.ttl(fetch_job(job_id, redis).key) > 0


def test_stop_sequence_cuts_the_text(stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    body = {"prompt": "hi", "max_tokens": 40, "temperature": 0}  # room for the analysis, then final
    free_id = app.post("/v1/jobs", json=body).get_json()["id"]
    schedule_all(scheduler, redis)
    work(config, redis, runtime, keys.SINGLE_QUEUE)
    text = app.get(f"/v1/jobs/{free_id}").get_json()["result"]["text"]
    stop = text.strip()[2:5]
    assert stop, f"the tiny model produced too little text to test stops: {text!r}"
    stopped_id = app.post("/v1/jobs", json={**body, "stop": [stop]}).get_json()["id"]
    schedule_all(scheduler, redis)
    work(config, redis, runtime, keys.SINGLE_QUEUE)
    result = app.get(f"/v1/jobs/{stopped_id}").get_json()["result"]
    assert result["finish_reason"] == "stop"
    assert stop not in result["text"] and text.startswith(result["text"])


def test_bad_payload_fails_that_job_only(stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    bad = queue.enqueue(keys.GENERATE_FUNC, {"prompt": "x", "temperature": 99}, failure_ttl=60)
    good_id = app.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 2}).get_json()["id"]
    schedule_all(scheduler, redis)
    work(config, redis, runtime, keys.SINGLE_QUEUE)
    view = app.get(f"/v1/jobs/{bad.id}").get_json()
    assert view["status"] == "failed"
    assert view["error"]["code"] == "generation_failed"
    assert bad.id in FailedJobRegistry(keys.SINGLE_QUEUE, connection=redis).get_job_ids()
    assert app.get(f"/v1/jobs/{good_id}").get_json()["status"] == "finished"
    assert StartedJobRegistry(keys.SINGLE_QUEUE, connection=redis).count == 0


def test_inflight_jobs_are_recovered(stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    job_id = app.post("/v1/jobs", json={"prompt": "hi"}).get_json()["id"]
    intake = Intake(redis)
    assert intake.take(0.1) is not None  # a scheduler took it, then died before routing it
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0
    assert intake.recover() == 1
    assert open_queue(keys.INCOMING_QUEUE, redis).job_ids == [job_id]
    schedule_all(scheduler, redis)
    assert app.get(f"/v1/jobs/{job_id}").get_json()["status"] == "scheduled"


def test_a_job_in_flight_when_redis_fails_goes_back_once_redis_answers(
    stack, redis: Redis, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The scheduler took a job (in flight) and lost Redis mid-decision: its next turn, once Redis
    answers, puts the job back on `incoming` (not only a scheduler's restart does)."""
    import threading

    from redis.exceptions import ConnectionError as RedisConnectionError

    config, app, scheduler = stack
    job_id = app.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 2}).get_json()["id"]
    intake, take, stop = scheduler._intake, scheduler._intake.take, threading.Event()
    turns: list[int] = []

    def take_then_lose_redis(timeout: float) -> object:
        turns.append(1)
        if len(turns) == 1:
            assert take(0.1) is not None  # in flight now
            raise RedisConnectionError("Redis went away")
        stop.set()
        return None

    monkeypatch.setattr(intake, "take", take_then_lose_redis)
    scheduler.run(stop)
    assert redis.llen(keys.SCHEDULER_INFLIGHT) == 0
    assert open_queue(keys.INCOMING_QUEUE, redis).job_ids == [job_id]
