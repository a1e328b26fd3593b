"""Batched workers end to end in one process: a real Redis, a real RQ worker in burst mode with a
batch of up to 16, SmolLM2 in fp32 (so batched greedy output equals single-request output)."""

from __future__ import annotations

import threading

import pytest
import torch
from prometheus_client import CollectorRegistry
from redis import Redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared import keys
from shared.cancellation import request_cancel
from shared.contract import JobRequest
from shared.jobstore import rqstore
from shared.jobstore.events import JobStream
from shared.jobstore.record import CacheTarget, JobRecord
from shared.jobstore.rqstore import fetch_job, open_queue
from shared.metrics import WorkerMetrics
from shared.registry import model_spec
from workers import context
from workers.batch import DecodeBatch
from workers.runtime import ModelRuntime
from workers.worker import build_worker

MODEL = "smollm2-135m"
TOPICS = ["a cat", "the sea", "a robot", "winter", "bread", "a king", "music", "the moon",
          "a river", "chess", "rain", "a train", "coffee", "a forest", "the sun", "a clock"]  # fmt: skip


@pytest.fixture(scope="module")
def runtime(prepared_models) -> ModelRuntime:  # type: ignore[no-untyped-def]
    spec = model_spec(MODEL)
    folder = spec.directory(prepared_models.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return ModelRuntime(spec, model, AutoTokenizer.from_pretrained(str(folder)), "cpu")


def payload(topic: str, max_tokens: int = 10, **extra: object) -> dict:
    messages = [{"role": "user", "content": f"Write one sentence about {topic}."}]
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}


def enqueue(redis: Redis, body: dict, queue: str = keys.SINGLE_QUEUE) -> str:
    return open_queue(queue, redis).enqueue(keys.GENERATE_FUNC, body, result_ttl=600, failure_ttl=600).id


def work(settings, redis: Redis, runtime: ModelRuntime, metrics=None, **overrides: object):  # type: ignore[no-untyped-def]
    config = settings(model=MODEL, observability=False, **{"max_batch_size": 16, **overrides})
    worker, _ = build_worker(config, redis, runtime.device)
    context.bind(runtime, worker.name, keys.SINGLE_QUEUE, metrics)
    worker.activity = "idle"
    worker.work(burst=True, logging_level=None)
    return worker


def stamps(redis: Redis, job_id: str) -> dict:
    return fetch_job(job_id, redis).meta["timestamps"]


def assert_clean(redis: Redis, worker) -> None:  # type: ignore[no-untyped-def]
    for queue in keys.queues_by_priority(keys.SINGLE_QUEUE):
        assert StartedJobRegistry(queue, connection=redis).count == 0
    assert redis.hlen(keys.RUNNING) == 0
    assert redis.scard(worker.executions_key) == 0 and not worker.running


def test_rq_internals_are_the_pinned_version() -> None:
    assert rqstore.rq_matches()


def test_sixteen_concurrent_jobs_match_their_single_outputs(settings, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    bodies = [payload(t, max_tokens=8 + i % 5) for i, t in enumerate(TOPICS)]
    single = [runtime.run(JobRequest.model_validate(b)).text for b in bodies]
    ids = [enqueue(redis, b) for b in bodies]
    worker = work(settings, redis, runtime)
    jobs = [fetch_job(i, redis) for i in ids]
    assert [j.get_status() for j in jobs] == ["finished"] * 16
    assert [j.return_value()["text"] for j in jobs] == single
    assert all(j.return_value()["worker"] == worker.name for j in jobs)
    # They ran together: every job started before the first one finished.
    assert max(stamps(redis, i)["started"] for i in ids) < min(stamps(redis, i)["finished"] for i in ids)
    assert FinishedJobRegistry(keys.SINGLE_QUEUE, connection=redis).count == 16
    assert all(len(redis.xrange(f"rq:results:{i}")) == 1 for i in ids)  # results as RQ stores them
    assert_clean(redis, worker)


def test_a_bad_request_fails_alone(settings, redis: Redis, runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    invalid = enqueue(redis, {"prompt": "x", "temperature": 99})
    good = [enqueue(redis, payload(t)) for t in TOPICS[:3]]
    broken = enqueue(redis, payload("a broken stream", max_tokens=20))
    text = JobStream.text

    def failing_text(self, channel: str, piece: str) -> None:  # type: ignore[no-untyped-def]
        if self._key == keys.job_stream(broken):
            raise RuntimeError("stream broke")
        text(self, channel, piece)

    monkeypatch.setattr(JobStream, "text", failing_text)
    worker = work(settings, redis, runtime)
    for job_id in (invalid, broken):
        job = fetch_job(job_id, redis)
        assert job.get_status() == "failed" and job.meta["error"]["code"] == "generation_failed"
    assert [fetch_job(i, redis).get_status() for i in good] == ["finished"] * 3
    failed = FailedJobRegistry(keys.SINGLE_QUEUE, connection=redis).get_job_ids()
    assert set(failed) == {invalid, broken}
    assert_clean(redis, worker)


def test_cancel_stops_one_request_mid_batch(settings, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    long = enqueue(redis, payload("the history of the world", max_tokens=200))
    others = [enqueue(redis, payload(t, max_tokens=30)) for t in TOPICS[:2]]

    def cancel_once_streaming() -> None:
        while not fetch_job(long, redis).meta.get("timestamps", {}).get("first_token"):
            threading.Event().wait(0.05)
        request_cancel(redis, long, 600)

    canceller = threading.Thread(target=cancel_once_streaming, daemon=True)
    canceller.start()
    worker = work(settings, redis, runtime)
    canceller.join(5)
    job = fetch_job(long, redis)
    assert job.meta["cancelled"]["code"] == "job_cancelled" and job.get_status() == "failed"
    assert [fetch_job(i, redis).get_status() for i in others] == ["finished"] * 2
    assert_clean(redis, worker)


def test_priorities_are_taken_first(settings, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    low = enqueue(redis, payload("a cat"), keys.priority_queue(keys.SINGLE_QUEUE, "low"))
    normal = enqueue(redis, payload("the sea"))
    high = enqueue(redis, payload("a robot"), keys.priority_queue(keys.SINGLE_QUEUE, "high"))
    work(settings, redis, runtime, max_batch_size=2)
    assert stamps(redis, high)["started"] <= stamps(redis, normal)["started"] < stamps(redis, low)["started"]
    assert stamps(redis, low)["started"] >= min(stamps(redis, i)["finished"] for i in (high, normal))


def test_the_kv_budget_bounds_the_batch(settings, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    bodies = [payload(t, max_tokens=12) for t in TOPICS[:6]]
    worst = max(runtime.prompt_length(JobRequest.model_validate(b)) + 12 for b in bodies)
    budget = 2 * worst * runtime.kv_bytes_per_token()  # room for two rows, not three
    ids = [enqueue(redis, b) for b in bodies]
    worker = work(settings, redis, runtime, kv_cache_budget_bytes=budget)
    spans = [(stamps(redis, i)["started"], stamps(redis, i)["finished"]) for i in ids]
    most = max(sum(1 for s, f in spans if s <= t < f) for t, _ in spans)
    assert most == 2
    assert [fetch_job(i, redis).get_status() for i in ids] == ["finished"] * 6
    assert_clean(redis, worker)


def test_seeded_sampling_is_per_request(settings, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    sampled = payload("a dragon", max_tokens=12, temperature=1.0, seed=1234)
    ids = [enqueue(redis, sampled), enqueue(redis, payload("bread")), enqueue(redis, sampled)]
    work(settings, redis, runtime)
    texts = [fetch_job(i, redis).return_value()["text"] for i in ids]
    assert texts[0] == texts[2]  # the same seed draws the same tokens beside other requests


def test_heartbeat_reports_the_batch(settings, redis: Redis, runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ids = [enqueue(redis, payload(t, max_tokens=6)) for t in TOPICS[:4]]
    config = settings(model=MODEL, observability=False, max_batch_size=16)
    worker, _ = build_worker(config, redis, runtime.device)
    context.bind(runtime, worker.name, keys.SINGLE_QUEUE)
    beats = []
    step = DecodeBatch.step

    def stepping(self: DecodeBatch) -> None:
        beats.append(worker.beat())
        step(self)

    monkeypatch.setattr(DecodeBatch, "step", stepping)
    worker.work(burst=True, logging_level=None)
    busiest = max(beats, key=lambda b: b.running)
    assert busiest.running == 4 and busiest.free_slots == 12 and set(busiest.running_jobs) == set(ids)
    assert busiest.state == "busy" and busiest.current_job in ids
    assert 0 < busiest.kv_cache_bytes <= (busiest.kv_cache_budget_bytes or 0)
    after = worker.beat()
    assert after.running == 0 and after.free_slots == 16 and after.state == "idle"


def enqueue_cacheable(redis: Redis, body: dict, fingerprint: str) -> str:
    """A job marked as the API marks a cacheable miss."""
    from shared.response_cache import store_target

    meta = JobRecord(cache_key=CacheTarget.model_validate(store_target(fingerprint, 600, 1 << 20))).to_meta()
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    return queue.enqueue(keys.GENERATE_FUNC, body, result_ttl=600, failure_ttl=600, meta=meta).id


def stream_events(redis: Redis, job_id: str) -> list[tuple[str, dict]]:
    import json

    return [(e[b"event"].decode(), json.loads(e[b"data"])) for _, e in redis.xrange(keys.job_stream(job_id))]


def test_requests_queued_behind_an_identical_one_are_answered_from_the_cache(
    settings, redis: Redis, runtime
) -> None:  # type: ignore[no-untyped-def]
    body = payload("a cat")
    first, second = enqueue_cacheable(redis, body, "f" * 64), enqueue_cacheable(redis, body, "f" * 64)
    worker = work(settings, redis, runtime, max_batch_size=1)  # one at a time: the second waited
    assert_clean(redis, worker)
    third = enqueue_cacheable(redis, body, "f" * 64)
    worker = work(settings, redis, runtime)  # the batch path
    assert_clean(redis, worker)
    results = [fetch_job(i, redis).return_value() for i in (first, second, third)]
    assert results[0]["cache"] == "miss" and results[0]["text"]
    assert results[1] == results[2] == {**results[0], "cache": "hit"}
    for job_id in (second, third):
        events = stream_events(redis, job_id)
        assert events[0][0] == "start" and events[-1][0] == "done"
        assert "".join(data["text"] for kind, data in events if kind == "token") == results[0]["text"]
        assert {"started", "first_token", "finished"} <= set(stamps(redis, job_id))


def test_identical_requests_in_one_batch_decode_once(settings, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    body = payload("the sea", max_tokens=12)
    ids = [enqueue_cacheable(redis, body, "e" * 64) for _ in range(3)]
    other = enqueue_cacheable(redis, payload("a robot"), "d" * 64)
    metrics = WorkerMetrics(CollectorRegistry())
    marks: set[bytes | None] = set()
    working = threading.Event()

    def watch() -> None:  # the worker marks the request as decoding by it while it decodes
        while not working.is_set():
            marks.add(redis.get(keys.decoding("e" * 64)))
            threading.Event().wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    worker = work(settings, redis, runtime, metrics)
    working.set()
    watcher.join(5)
    assert worker.name.encode() in marks and redis.get(keys.decoding("e" * 64)) is None
    assert_clean(redis, worker)
    labels = {"model": MODEL, "source": "identical"}
    assert metrics.registry.get_sample_value("gptoss_worker_cache_hits_total", labels) == 2
    leader, *followers = [fetch_job(i, redis).return_value() for i in ids]
    assert leader["cache"] == "miss" and leader["text"] == runtime.run(JobRequest.model_validate(body)).text
    assert followers == [{**leader, "cache": "hit"}] * 2
    assert fetch_job(other, redis).return_value()["cache"] == "miss"
    done = stamps(redis, ids[0])["finished"]
    for job_id in ids[1:]:
        # Started while the first decoded (not a later cache hit), answered when it finished.
        assert stamps(redis, job_id)["started"] < done <= stamps(redis, job_id)["finished"]
        events = stream_events(redis, job_id)
        assert events[0][0] == "start" and events[-1][0] == "done"
        assert "".join(data["text"] for kind, data in events if kind == "token") == leader["text"]
    assert FinishedJobRegistry(keys.SINGLE_QUEUE, connection=redis).count >= 4


def test_a_follower_decodes_itself_when_its_leader_is_cancelled(settings, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    body = payload("the history of the world", max_tokens=40)
    leader, follower, leaving = (enqueue_cacheable(redis, body, "c" * 64) for _ in range(3))

    def cancel_once_streaming() -> None:
        while not fetch_job(leader, redis).meta.get("timestamps", {}).get("first_token"):
            threading.Event().wait(0.05)
        request_cancel(redis, leaving, 600)  # a follower cancelled: it ends at once
        request_cancel(redis, leader, 600)  # the leader cancelled: its follower decodes itself

    canceller = threading.Thread(target=cancel_once_streaming, daemon=True)
    canceller.start()
    worker = work(settings, redis, runtime)
    canceller.join(5)
    assert_clean(redis, worker)
    for job_id in (leader, leaving):
        job = fetch_job(job_id, redis)
        assert job.get_status() == "failed" and job.meta["cancelled"]["code"] == "job_cancelled"
        assert stream_events(redis, job_id)[-1][0] == "error"
    job = fetch_job(follower, redis)
    assert job.get_status() == "finished"
    result = job.return_value()
    assert result["cache"] == "miss" and result["text"] == runtime.run(JobRequest.model_validate(body)).text
    assert stamps(redis, follower)["started"] < stamps(redis, leader)["finished"]
