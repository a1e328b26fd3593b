"""The worker's parts on their own: the serial decoder (one row at a time, for models that cannot
batch), the memory guard, the heartbeat's bookkeeping, followers and session turns; and one worker
path: a model that cannot batch runs its jobs through the same session, one row at a time."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from redis import Redis

from shared import keys
from shared.contract import JobRequest
from shared.jobstore.rqstore import fetch_job, open_queue
from shared.metrics import WorkerMetrics
from workers import context
from workers.batch import Row
from workers.completion import Completion
from workers.guard import REUSE_READING, MemoryGuard
from workers.jobs import generate
from workers.output import OutputText
from workers.runtime import ModelRuntime
from workers.sampling import sampler_for
from workers.serial import SerialDecoder
from workers.sessions import SessionStore
from workers.slots import Follower, Followers
from workers.state import WorkerState
from workers.turns import SessionTurns
from workers.worker import build_worker

QUESTIONS = ["a cat", "the sea", "a robot"]


def ask(topic: str, max_tokens: int = 8) -> JobRequest:
    messages = [{"role": "user", "content": f"Write one sentence about {topic}."}]
    return JobRequest.model_validate({"messages": messages, "max_tokens": max_tokens, "temperature": 0})


class Relay:
    """A tensor-parallel relay with no other ranks: it only counts the requests it hands over."""

    def __init__(self) -> None:
        self.shared: list[JobRequest | None] = []

    def share(self, request: JobRequest | None) -> JobRequest | None:
        self.shared.append(request)
        return request


@pytest.fixture(scope="module")
def serial_runtime(fp32_runtime: ModelRuntime) -> ModelRuntime:
    """SmolLM2 as a runtime that cannot batch (a relay, as under tensor parallel)."""
    r = fp32_runtime
    return ModelRuntime(r.spec, r.model, r.tokenizer, r.device, r.chat, relay=Relay())


# --- the serial decoder ----------------------------------------------------------------------------


def counting_completion(max_tokens: int, eos: int = 99) -> Completion:
    return Completion([1, 2], max_tokens, {eos}, OutputText(), lambda token: None)


class Counter:
    """A runtime that completes a row by counting up from 10 (a failure for row `fails`)."""

    device = "cpu"

    def __init__(self, fails: Completion | None = None):
        self.fails, self.completed = fails, 0

    def complete(self, request: JobRequest, completion: Completion, cancelled: Any = None) -> bool:
        self.completed += 1
        if completion is self.fails:
            raise RuntimeError("model broke")
        while not completion.ended:
            completion.add(10 + len(completion.token_ids))
        return False


def test_the_serial_decoder_decodes_one_row_to_its_end_per_step() -> None:
    broken = counting_completion(3)
    runtime = Counter(fails=broken)
    decoder = SerialDecoder(runtime)
    completions = {"a": counting_completion(3), "b": broken, "c": counting_completion(2)}
    rows = [Row(key, c, sampler_for(ask(key), "cpu"), request=ask(key)) for key, c in completions.items()]
    decoder.join(rows)
    assert len(decoder) == 3 and decoder.length == 0 and decoder.device == "cpu"
    decoder.step()
    assert rows[0].completion.token_ids == [10, 11, 12] and rows[0].completion.ended
    assert not rows[1].completion.token_ids and not rows[2].completion.token_ids
    decoder.step()
    assert isinstance(rows[1].error, RuntimeError) and not rows[2].completion.token_ids  # fails alone
    decoder.step()
    assert rows[2].completion.token_ids == [10, 11] and runtime.completed == 3
    decoder.step()  # nothing left to decode
    assert runtime.completed == 3
    assert [r.key for r in decoder.drop({"a", "b"})] == ["a", "b"] and [r.key for r in decoder.rows] == ["c"]
    assert decoder.row_state("c") is None  # no cache outlives a step


def test_a_runtime_that_cannot_batch_decodes_rows_alone_like_single_generation(
    serial_runtime: ModelRuntime, fp32_runtime: ModelRuntime
) -> None:
    decoder = serial_runtime.decoder()
    assert isinstance(decoder, SerialDecoder) and not serial_runtime.can_batch
    assert not isinstance(fp32_runtime.decoder(), SerialDecoder)
    requests = [ask(q, max_tokens=6 + i) for i, q in enumerate(QUESTIONS)]
    rows = [
        Row(str(i), serial_runtime.completion(r), sampler_for(r, "cpu"), request=r)
        for i, r in enumerate(requests)
    ]
    decoder.join(rows)
    for _ in rows:
        decoder.step()
    single = [fp32_runtime.run(r) for r in requests]
    assert [r.completion.result() for r in rows] == single
    relay = serial_runtime.relay
    assert isinstance(relay, Relay) and relay.shared[-3:] == requests  # each handed to the other ranks


# --- the memory guard and the heartbeat's bookkeeping ---------------------------------------------


def test_the_guard_reuses_a_reading_sheds_sessions_over_warn_and_stops_taking_over_critical(
    settings, tmp_path, clock
) -> None:  # type: ignore[no-untyped-def]
    reading = tmp_path / "memory.json"
    reading.write_text(json.dumps({"used": 10, "total": 1000}))
    guard = MemoryGuard(settings(memory_reading_file=reading, session_cache_bytes=10**6), "cpu", clock=clock)
    store = guard.session_store()
    assert store is not None and guard.sessions is store
    store.put("t:s", [1], [(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))])
    assert guard.may_take()
    reading.write_text(json.dumps({"used": 990, "total": 1000}))  # over critical
    clock.advance(REUSE_READING / 2)
    assert guard.may_take() and len(store) == 1  # the last reading still holds
    clock.advance(REUSE_READING)
    assert not guard.may_take() and len(store) == 0  # read again: take nothing, caches shed
    kept = guard.kv_budget(10)
    assert guard.kv_budget(20) is kept and kept.bytes_per_token == 10 and guard.kv is kept


def test_the_guard_pauses_while_critical_until_stopped(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reading = tmp_path / "memory.json"
    reading.write_text(json.dumps({"used": 990, "total": 1000}))
    guard = MemoryGuard(settings(memory_reading_file=reading), "cpu")
    beats: list[int] = []
    guard.pause_while_critical(lambda: len(beats) >= 2, lambda: beats.append(1))
    assert beats == [1, 1]  # kept alive while paused, until asked to stop
    reading.write_text(json.dumps({"used": 10, "total": 1000}))
    guard.pause_while_critical(lambda: False, lambda: beats.append(1))
    assert beats == [1, 1]  # not critical: no pause


class Session:
    kv_bytes = 4096


def test_the_state_counts_jobs_and_reports_them_in_the_heartbeat(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reading = tmp_path / "memory.json"
    reading.write_text(json.dumps({"used": 250, "total": 1000}))
    config = settings(memory_reading_file=reading, max_batch_size=4, session_cache_bytes=0)
    guard = MemoryGuard(config, "cpu")
    state = WorkerState("w1", config, "cpu", guard, WorkerMetrics(CollectorRegistry()))
    assert state.beat().state == "loading" and state.beat().kv_cache_budget_bytes is None
    state.began("j1", "gpu-single")
    state.began("j2", "gpu-single")
    state.session = Session()
    guard.kv_budget(8)
    beat = state.beat()
    assert (beat.state, beat.running, beat.free_slots, beat.running_jobs) == ("busy", 2, 2, ["j1", "j2"])
    assert beat.kv_cache_bytes == 4096 and beat.kv_cache_budget_bytes is not None and beat.pressure == 0.25
    state.ended("j1", 2.0, completion_tokens=10)
    assert state.tokens_per_second == 5.0 and state.activity == "busy" and state.jobs_done == 1
    state.ended("j2", 0.0)  # failed: no rate
    assert state.tokens_per_second == 5.0 and state.activity == "idle" and not state.running
    state.began("j3", "gpu-single")
    state.clear()  # handed back
    assert state.activity == "idle" and not state.running and state.jobs_done == 2


# --- followers and session turns ---------------------------------------------------------------------


def test_followers_wait_by_fingerprint() -> None:
    a, b, c = (Follower(None, None, None, None, 0.0, ask("x"), [i]) for i in range(3))  # type: ignore[arg-type]
    followers = Followers()
    followers.add("f1", a)
    followers.add("f1", b)
    followers.add("f2", c)
    assert len(followers) == 3 and followers.all() == [a, b, c]
    followers.remove("f1", a)
    assert followers.all() == [b, c]
    assert followers.take("f1") == [b] and followers.take("f1") == [] and len(followers) == 1
    followers.remove("f2", c)
    assert len(followers) == 0 and followers.all() == []


def test_session_turns_reuse_a_prefix_and_leave_theirs_for_the_next_turn(redis: Redis) -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    turns = SessionTurns(SessionStore(10**6, 600), redis, "w1", 600, "m", metrics)
    key = turns.key("t", "s")
    assert turns.reuse(key, [1, 2, 3]) is None
    layers = [(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))]
    turns.keep(key, "t", "s", ([1, 2, 3], layers))
    assert redis.get(keys.session_affinity("t", "s")) == b"w1"
    prefix = turns.reuse(key, [1, 2, 3, 4, 5])
    assert prefix is not None and prefix.length == 3
    turns.keep(turns.key("t", "other"), "t", "other", None)  # nothing lined up: nothing kept
    assert redis.get(keys.session_affinity("t", "other")) is None
    sample = metrics.registry.get_sample_value
    assert sample("gptoss_session_cache_hits_total", {"model": "m"}) == 1
    assert sample("gptoss_session_cache_misses_total", {"model": "m"}) == 1


# --- one worker path ---------------------------------------------------------------------------------


def test_rq_never_runs_generation_itself() -> None:
    with pytest.raises(RuntimeError, match="session"):
        generate({"prompt": "hi"})


def test_a_worker_that_cannot_batch_runs_its_jobs_through_the_session_one_at_a_time(
    settings, redis: Redis, serial_runtime: ModelRuntime, fp32_runtime: ModelRuntime
) -> None:  # type: ignore[no-untyped-def]
    requests = [ask(q, max_tokens=6) for q in QUESTIONS]
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    ids = [queue.enqueue(keys.GENERATE_FUNC, r.model_dump(mode="json"), result_ttl=600).id for r in requests]
    invalid = queue.enqueue(keys.GENERATE_FUNC, {"prompt": "x", "temperature": 99}, failure_ttl=600).id
    worker, _ = build_worker(settings(model="smollm2-135m", max_batch_size=8), redis, "cpu")
    context.bind(serial_runtime, worker.name, keys.SINGLE_QUEUE)
    worker.activity = "idle"
    worker.work(burst=True, logging_level=None)
    jobs = [fetch_job(i, redis) for i in ids]
    assert [j.get_status() for j in jobs] == ["finished"] * 3
    assert [j.return_value()["text"] for j in jobs] == [fp32_runtime.run(r).text for r in requests]
    spans = sorted((j.meta["timestamps"]["started"], j.meta["timestamps"]["finished"]) for j in jobs)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(2))  # one at a time
    failed = fetch_job(invalid, redis)
    assert failed.get_status() == "failed" and failed.meta["error"]["code"] == "generation_failed"
    assert (
        redis.hlen(keys.RUNNING) == 0 and not worker.running and worker.beat().kv_cache_budget_bytes is None
    )


def test_a_job_cancelled_or_expired_on_its_way_is_refused_without_starting(
    settings, redis: Redis, fp32_runtime: ModelRuntime
) -> None:  # type: ignore[no-untyped-def]
    from shared.cancellation import request_cancel
    from shared.drain import enter_backlog, tenant_waiting
    from shared.jobstore.record import JobRecord

    queue = open_queue(keys.SINGLE_QUEUE, redis)
    body = ask("a cat", max_tokens=4).model_dump(mode="json")
    cancelled = queue.enqueue(keys.GENERATE_FUNC, body, failure_ttl=600, meta=JobRecord(tenant="t").to_meta())
    late = queue.enqueue(keys.GENERATE_FUNC, body, failure_ttl=600, meta=JobRecord(deadline=1.0).to_meta())
    fine = queue.enqueue(keys.GENERATE_FUNC, body, result_ttl=600).id
    request_cancel(redis, cancelled.id, 600)
    pipe = redis.pipeline()
    enter_backlog(pipe, "t", cancelled.id, 1.0)
    pipe.execute()
    worker, _ = build_worker(settings(model="smollm2-135m"), redis, "cpu")
    context.bind(fp32_runtime, worker.name, keys.SINGLE_QUEUE)
    worker.work(burst=True, logging_level=None)
    for job, ending in ((cancelled, "cancelled"), (late, "expired")):
        job = fetch_job(job.id, redis)
        record = JobRecord.from_meta(job.meta)
        assert job.get_status() == "failed" and getattr(record, ending) is not None
        assert record.at("started") is None and record.at("finished") is not None and record.attempt == 0
        events = [e[b"event"] for _, e in redis.xrange(keys.job_stream(job.id))]
        assert events == [b"error"]
    assert fetch_job(fine, redis).get_status() == "finished"
    assert tenant_waiting(redis, "t") == 0 and redis.hlen(keys.RUNNING) == 0 and worker.report.jobs_done == 3


def test_a_worker_hands_its_running_jobs_back_to_the_front_of_their_queue(settings, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    from shared.jobstore import lifecycle, runs

    queue = open_queue(keys.SINGLE_QUEUE, redis)
    running, waiting = (queue.enqueue(keys.GENERATE_FUNC, {"prompt": p}) for p in ("a", "b"))
    worker, _ = build_worker(settings(), redis, "cpu")
    taken = runs.take(redis, worker.name, [q.name for q in worker.queues])
    assert taken is not None and taken[0].id == running.id
    worker.report.began(running.id, queue.name)
    runs.start(redis, worker, taken[0], lifecycle.read(taken[0]), queue.name)
    worker.hand_back_running("its worker lost Redis mid-job")
    assert (
        queue.get_job_ids() == [running.id, waiting.id]
        and fetch_job(running.id, redis).get_status() == "queued"
    )
    assert redis.hlen(keys.RUNNING) == 0 and not worker.running and worker.activity == "idle"
    assert [e[b"event"] for _, e in redis.xrange(keys.job_stream(running.id))] == [b"retry"]
