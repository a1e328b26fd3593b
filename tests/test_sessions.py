"""Session KV reuse inside a worker: the prefix decision, the bounded store, and a second turn that
reuses its first turn's keys and values yet decodes exactly what a cold run does (fp32, greedy)."""

from __future__ import annotations

import json
import signal
import socket

import pytest
import requests
import torch
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.contract import JobRequest
from shared.registry import model_spec
from tests.conftest import Processes, http_ok, poll_job, process_env, wait_for
from workers.batch import Row
from workers.runtime import ModelRuntime
from workers.sampling import sampler_for
from workers.sessions import SessionStore, reusable_prefix, session_budget, session_key


def test_reusable_prefix_is_the_common_start_keeping_one_token_to_compute() -> None:
    assert reusable_prefix([1, 2, 3, 4], [1, 2, 3, 4, 5, 6]) == 4
    assert reusable_prefix([1, 2, 9, 4], [1, 2, 3, 4, 5]) == 2  # diverged at the third token
    assert reusable_prefix([1, 2, 3], [1, 2, 3]) == 2  # the last prompt token is computed again
    assert reusable_prefix([7, 8], [1, 2, 3]) == 0
    assert reusable_prefix([], [1]) == 0


def layers(tokens: int, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of `tokens` tokens: 2 heads of 4 fp32 values, 32 bytes per tensor per token."""
    return [(torch.randn(1, 2, tokens, 4), torch.randn(1, 2, tokens, 4)) for _ in range(count)]


def test_store_evicts_least_recently_used_beyond_its_budget() -> None:
    per_token = 2 * 2 * (2 * 4 * 4)  # two layers, keys and values, 2 heads of 4 fp32
    store = SessionStore(budget=25 * per_token, ttl=60)
    assert store.put("a", list(range(10)), layers(10))
    assert store.put("b", list(range(10)), layers(10))
    assert store.take("a", list(range(12))) is not None  # a is now the most recently used
    assert store.put("c", list(range(10)), layers(10))  # 30 tokens > 25: b goes
    assert "b" not in store and "a" in store and "c" in store
    assert store.nbytes == 20 * per_token
    assert not store.put("huge", list(range(30)), layers(30))  # over the budget alone: not kept
    assert "huge" not in store and store.nbytes == 20 * per_token
    assert store.shed() == 20 * per_token and len(store) == 0 and store.nbytes == 0


def test_store_hands_out_the_shared_prefix_and_forgets_idle_sessions() -> None:
    now = [0.0]
    store = SessionStore(budget=10**6, ttl=30, clock=lambda: now[0])
    kept = layers(6)
    store.put("t:s", [1, 2, 3, 4, 5, 6], kept)
    prefix = store.take("t:s", [1, 2, 3, 4, 9, 9])
    assert prefix is not None and prefix.length == 4
    assert torch.equal(prefix.layers[0][0], kept[0][0][:, :, :4])
    assert store.take("t:s", [5, 5, 5]) is None  # nothing shared: a full prefill
    assert store.take("other:s", [1, 2, 3, 4, 5]) is None
    now[0] = 29.0
    store.expire()
    assert "t:s" in store  # used at 0 s, 29 s ago... still within 30 s
    now[0] = 100.0
    store.expire()
    assert "t:s" not in store and store.nbytes == 0


def test_session_keys_and_budget() -> None:
    assert session_key("acme", "chat-1") != session_key("other", "chat-1")
    assert session_budget(None, 1000) == 100 and session_budget(0, 1000) == 0


def decode(runtime: ModelRuntime, rows: list[Row], store: SessionStore | None = None) -> None:
    """Decode `rows` in one batch to their ends; a row keyed like a session leaves its state in `store`."""
    batch = runtime.new_batch()
    batch.join(rows)
    while batch.rows:
        ended = {r.key for r in batch.rows if r.completion.ended}
        for key in ended:
            state = batch.row_state(key)
            if store is not None and state is not None:
                store.put(key, *state)
        batch.drop(ended)
        batch.step()


def second_turn_reuses_its_prefix(runtime: ModelRuntime, first: list[dict[str, str]], follow_up: str) -> None:
    store = SessionStore(budget=10**9, ttl=60)
    turn1 = JobRequest(messages=first, max_tokens=24, temperature=0)
    row = Row("t:s", runtime.completion(turn1), sampler_for(turn1, "cpu"))
    other = JobRequest(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, temperature=0)
    decode(runtime, [row, Row("other", runtime.completion(other), sampler_for(other, "cpu"))], store)
    reply = row.completion.result()
    assert "t:s" in store

    turn2 = JobRequest(
        messages=[
            *first,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": follow_up},
        ],
        max_tokens=16,
        temperature=0,
    )
    cold = runtime.run(turn2)
    completion = runtime.completion(turn2)
    prefix = store.take("t:s", completion.prompt_ids)
    assert prefix is not None and prefix.length >= len(row.completion.prompt_ids)  # turn 1's prompt at least
    completion.cached_tokens = prefix.length
    warm = Row("t:s", completion, sampler_for(turn2, "cpu"), prefix=prefix)
    late = JobRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    decode(runtime, [Row("late", runtime.completion(late), sampler_for(late, "cpu")), warm])
    result = completion.result()
    assert result.token_ids == cold.token_ids
    assert result.text == cold.text
    assert result.cached_tokens == prefix.length and result.prompt_tokens == cold.prompt_tokens


def test_second_turn_reuses_the_first_turns_cache_and_decodes_like_a_cold_run(
    fp32_runtime: ModelRuntime,
) -> None:
    first = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Tell me one fact about the moon."},
    ]
    second_turn_reuses_its_prefix(fp32_runtime, first, "And one about the sun?")


def test_harmony_second_turn_reuses_its_prefix(prepared_models) -> None:  # type: ignore[no-untyped-def]
    from workers.tiny_model import CONVERSATIONS

    tiny = ModelRuntime.load(model_spec("tiny-gpt-oss"), prepared_models)  # fp32
    question, _, _ = CONVERSATIONS[0]
    second_turn_reuses_its_prefix(tiny, [{"role": "user", "content": question}], CONVERSATIONS[1][0])


# End to end: API, scheduler and two workers as a user starts them, on the tiny gpt-oss (fp32).


@pytest.fixture
def two_workers(redis: Redis, redis_url: str, prepared_models, processes: Processes):  # type: ignore[no-untyped-def]
    """API, scheduler and two gpu-single workers up; (base URL, {worker name: process})."""
    port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
        GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_HEARTBEAT_INTERVAL=0.25, GPTOSS_HEARTBEAT_TTL=2,
    )  # fmt: skip
    processes.start("api", ["api"], env)
    processes.start("scheduler", ["scheduler"], env)
    workers = {}
    for index in range(2):
        child = processes.start(f"worker-{index}", ["workers"], {**env, "GPTOSS_WORKER_QUEUE": "gpu-single"})
        workers[f"{socket.gethostname()}.{child.pid}.gpu-single"] = child
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_ok(f"{base}/healthz"), 30, "the API")
    wait_for(lambda: _idle_workers(redis) == 2, 60, "two live workers")
    return base, workers


def _idle_workers(redis: Redis) -> int:
    found = list(redis.scan_iter(match=keys.WORKER_HEARTBEAT_PATTERN))
    return (
        sum(1 for raw in redis.mget(found) if raw and json.loads(raw)["state"] != "loading") if found else 0
    )


def turn(base: str, messages: list[dict[str, str]], **extra: object) -> dict:
    body = {"messages": messages, "max_tokens": 30, "temperature": 0, **extra}
    job_id = requests.post(f"{base}/v1/jobs", json=body, timeout=10).json()["id"]
    view = poll_job(base, job_id, timeout=60)
    assert view["status"] == "finished", view
    return view


def test_a_sessions_turns_reuse_its_workers_cache_and_survive_losing_it(two_workers, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    from workers.tiny_model import CONVERSATIONS

    base, workers = two_workers
    chat = [{"role": "user", "content": CONVERSATIONS[0][0]}]
    first = turn(base, chat, session_id="chat-1")
    holder = first["result"]["worker"]
    assert first["result"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert redis.get(keys.session_affinity(keys.DEFAULT_TENANT, "chat-1")) == holder.encode()

    chat += [
        {"role": "assistant", "content": first["result"]["text"]},
        {"role": "user", "content": CONVERSATIONS[1][0]},
    ]
    second = turn(base, chat, session_id="chat-1")
    assert second["route"]["reason"] == "session_affinity"
    assert second["result"]["worker"] == holder
    cached = second["result"]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["result"]["usage"]["prompt_tokens"] <= cached < second["result"]["usage"]["prompt_tokens"]
    cold = turn(base, chat, cache=False)  # no session: a full prefill, wherever it runs
    assert "prompt_tokens_details" not in cold["result"]["usage"]
    assert (second["result"]["text"], second["result"]["reasoning"]) == (
        cold["result"]["text"],
        cold["result"]["reasoning"],
    )

    workers[holder].send_signal(signal.SIGKILL)  # the cache dies with its worker
    wait_for(lambda: _idle_workers(redis) == 1, 30, "the holder's heartbeat to lapse")
    chat += [
        {"role": "assistant", "content": second["result"]["text"]},
        {"role": "user", "content": CONVERSATIONS[2][0]},
    ]
    third = turn(base, chat, session_id="chat-1")
    assert third["route"]["reason"] != "session_affinity"
    assert third["result"]["worker"] != holder
    assert third["result"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    fourth = turn(base, [*chat, {"role": "assistant", "content": third["result"]["text"]},
                         {"role": "user", "content": "Thanks."}], session_id="chat-1")  # fmt: skip
    assert fourth["route"]["reason"] == "session_affinity"  # the new holder's cache
    assert fourth["result"]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_turns_waiting_on_a_dead_workers_queue_are_routed_afresh(redis: Redis) -> None:
    from rq import Queue

    from scheduler.reaper import Reaper
    from shared.jobstore.rqstore import SERIALIZER

    own = Queue(keys.own_queue("gone-worker"), connection=redis, serializer=SERIALIZER)
    job = own.enqueue(keys.GENERATE_FUNC, {"prompt": "hi", "session_id": "s"}, meta={"priority": "high"})
    Reaper(redis, max_retries=2, settle=0).sweep()
    assert own.count == 0 and keys.own_queue("gone-worker") not in [
        q.name for q in Queue.all(connection=redis)
    ]
    incoming = Queue(
        keys.priority_queue(keys.INCOMING_QUEUE, "high"), connection=redis, serializer=SERIALIZER
    )
    assert incoming.get_job_ids() == [job.id]


def test_session_caches_go_first_under_memory_pressure(redis: Redis, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from workers.worker import build_worker

    reading = tmp_path / "memory.json"
    reading.write_text(json.dumps({"used": 10, "total": 1000}))
    worker, _ = build_worker(settings(memory_reading_file=reading, session_cache_bytes=10**6), redis, "cpu")
    guard = worker.guard
    store = guard.session_store()
    assert store is not None and store.budget == 10**6
    store.put("t:s", [1, 2, 3], layers(3))
    assert guard.may_take() and "t:s" in store  # no pressure: kept
    reading.write_text(json.dumps({"used": 900, "total": 1000}))  # over warn (0.85), under critical
    guard._pressure_checked = 0.0  # the reading is reused for half a second otherwise
    assert guard.may_take()  # still takes work...
    assert len(store) == 0 and store.nbytes == 0  # ...but the session caches are gone
    assert build_worker(settings(session_cache_bytes=0), redis, "cpu")[0].guard.session_store() is None


def test_jobs_in_workers_own_queues_are_counted_cancellable_and_reported(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import CollectorRegistry, generate_latest
    from rq.registry import FailedJobRegistry
    from rq.results import Result

    from api.bundle import failures, queue_sizes
    from api.metrics import RedisStateCollector
    from shared.capacity import capacity_view
    from shared.jobstore import lifecycle
    from shared.jobstore.lifecycle import waiting_count as backlog
    from shared.jobstore.rqstore import open_queue

    name = keys.own_queue("w1")
    own = open_queue(name, redis)
    waiting = own.enqueue(keys.GENERATE_FUNC, {"prompt": "hi", "session_id": "s"})
    failed = own.enqueue(keys.GENERATE_FUNC, {"prompt": "bye", "session_id": "s"})
    own.remove(failed)  # failed as RQ records it: a failure result, and the failed registry
    Result.create_failure(failed, ttl=600, exc_string="Traceback: boom")
    FailedJobRegistry(queue=own).add(failed, ttl=600, exc_string="Traceback: boom")

    assert backlog(redis) == 1  # admission sees the waiting turn
    assert capacity_view(redis, settings())["queues"][name] == 1
    assert queue_sizes(redis)[name]["waiting"] == 1 and queue_sizes(redis)[name]["failed"] == 1
    found = [f for f in failures(redis) if f["queue"] == name]
    assert [(f["id"], f["traceback"]) for f in found] == [(failed.id, "Traceback: boom")]
    registry = CollectorRegistry()
    registry.register(RedisStateCollector(redis))
    text = generate_latest(registry).decode()
    assert 'gptoss_requests_waiting{queue="own"} 1.0' in text
    assert 'gptoss_registry_jobs{queue="own",registry="failed"} 1.0' in text
    assert "worker:w1" not in text  # no series per worker process

    assert lifecycle.cancel(redis, waiting, "Cancelled.")  # a cancel takes it out of the worker's queue
    assert own.count == 0 and backlog(redis) == 0
