"""The worker's outage path in one process: a Redis error anywhere in a worker (its session, RQ's loop
start and end, its heartbeat thread) makes it take nothing new, wait for Redis, hand back what it
was running and go on; nothing ends the process or a thread. The same with real processes and a
real Redis outage: tests/test_outage.py."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared import keys
from shared.heartbeat import Heartbeat, SchedulerBeat
from shared.jobstore.record import JobRecord
from shared.jobstore.rqstore import fetch_job, open_queue
from shared.settings import Settings
from tests.conftest import TINY, sentence_request, wait_for, work
from workers import worker as worker_module
from workers.batch import DecodeBatch
from workers.main import work_until_stopped
from workers.worker import GenerationWorker, build_worker


def fail_first(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, times: int) -> list[int]:
    """`owner.name` raises a Redis ConnectionError on its first `times` calls; the calls, counted."""
    method = getattr(owner, name)
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= times:
            raise RedisConnectionError("Redis went away")
        return method(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return calls


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker retries Redis at once (its backoff is for real outages)."""
    from tenacity import wait_none

    monkeypatch.setattr(worker_module, "REDIS_WAIT", wait_none())


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """RQ's loop installs its own SIGTERM and SIGINT handlers; the test process gets its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


# --- the heartbeat thread ------------------------------------------------------------------------


class FlakyRedis:
    """A Redis whose first `fails` pipelines raise ConnectionError when executed (the rest go to
    `redis`): a heartbeat is written in one pipeline."""

    def __init__(self, redis: Redis, fails: int):
        self._redis, self.fails = redis, fails

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._redis.pipeline(*args, **kwargs)
        if self.fails > 0:
            self.fails -= 1

            def went_away() -> Any:
                raise RedisConnectionError("Redis went away")

            pipe.execute = went_away  # type: ignore[method-assign]
        return pipe

    def delete(self, *names: str) -> Any:
        return self._redis.delete(*names)


def test_the_heartbeat_thread_outlives_redis_errors_and_failed_snapshots(redis: Redis) -> None:
    taken = 0

    def snapshot() -> SchedulerBeat:
        nonlocal taken
        taken += 1
        if taken <= 2:
            raise ValueError("the memory reading could not be parsed")
        return SchedulerBeat(name="s1", pid=1, host="h", at=time.time())

    key = "gptoss:test:heartbeat"
    beat = Heartbeat(FlakyRedis(redis, 2), key, snapshot, 0.01, 5)  # type: ignore[arg-type]
    beat.start()  # its first snapshot fails at once: logged, not raised
    try:
        wait_for(lambda: redis.get(key) is not None, 10, "a heartbeat after two failed snapshots and writes")
        redis.delete(key)
        wait_for(lambda: redis.get(key) is not None, 10, "the thread to keep beating")
    finally:
        beat.stop()
    assert redis.get(key) is None and taken >= 5


# --- RQ's loop: its start and its end ---------------------------------------------------------------


def test_rq_loop_end_without_redis_is_recorded_once_redis_answers(
    settings: Callable[..., Settings], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _ = build_worker(settings(), redis, "cpu")
    deaths = fail_first(monkeypatch, GenerationWorker, "register_death", 2)
    assert worker.work(burst=True, logging_level=None) is False  # its teardown met no Redis: no raise
    assert not redis.hexists(worker.key, "death")
    # The outage path records it (the second try also fails: it waits and tries again).
    assert worker.ride_out_outage(RedisConnectionError("Redis went away"), loop_ended=True)
    assert len(deaths) == 3 and redis.hexists(worker.key, "death")


def test_the_work_loop_starts_again_when_its_start_meets_no_redis(
    settings: Callable[..., Settings], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _ = build_worker(settings(), redis, "cpu")
    births = fail_first(monkeypatch, GenerationWorker, "register_birth", 1)
    deaths = fail_first(monkeypatch, GenerationWorker, "register_death", 1)  # still away at first
    job = open_queue(keys.SINGLE_QUEUE, redis).enqueue("os.getpid", result_ttl=600)

    def stop_once_done() -> None:
        try:
            wait_for(lambda: fetch_job(job.id, redis).get_status() == "finished", 60, "the job")
        finally:
            worker.ask_stop()

    watcher = threading.Thread(target=stop_once_done, daemon=True)
    watcher.start()
    work_until_stopped(worker, burst=False)  # returns only once asked to stop
    watcher.join(10)
    assert fetch_job(job.id, redis).get_status() == "finished" and redis.hlen(keys.RUNNING) == 0
    assert len(births) == 2 and len(deaths) == 3  # the failed start's end, again, then the last end


def test_a_worker_paused_for_memory_rides_out_redis_failing_its_keep_alive(
    settings: Callable[..., Settings], redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reading = tmp_path / "memory.json"
    reading.write_text(json.dumps({"used": 990, "total": 1000}))  # over critical: it takes nothing
    worker, _ = build_worker(settings(memory_reading_file=reading), redis, "cpu")
    beats = fail_first(monkeypatch, GenerationWorker, "heartbeat", 1)  # the pause's first keep-alive
    job = open_queue(keys.SINGLE_QUEUE, redis).enqueue("os.getpid", result_ttl=600)

    def relieve_once_paused_again() -> None:
        try:
            wait_for(lambda: len(beats) >= 3, 30, "the pause to go on after the failed keep-alive")
        finally:
            reading.write_text(json.dumps({"used": 10, "total": 1000}))

    reliever = threading.Thread(target=relieve_once_paused_again, daemon=True)
    reliever.start()
    worker.work(burst=True, logging_level=None)
    reliever.join(10)
    assert fetch_job(job.id, redis).get_status() == "finished" and redis.hlen(keys.RUNNING) == 0


# --- a session that loses Redis ----------------------------------------------------------------------


def test_a_session_that_loses_redis_hands_its_jobs_back_and_each_ends_once(
    settings: Callable[..., Settings], redis: Redis, runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    bodies = [
        sentence_request(topic, max_tokens=12).model_dump(mode="json") for topic in ("a cat", "the sea")
    ]
    ids = [queue.enqueue(keys.GENERATE_FUNC, b, result_ttl=600, failure_ttl=600).id for b in bodies]
    steps = 0
    step = DecodeBatch.step

    def step_then_lose_redis(self: DecodeBatch) -> None:
        nonlocal steps
        steps += 1
        if steps == 3:  # both rows are decoding when Redis goes away
            raise RedisConnectionError("Redis went away")
        step(self)

    monkeypatch.setattr(DecodeBatch, "step", step_then_lose_redis)
    worker = work(settings(model=TINY, observability=False), redis, runtime, keys.SINGLE_QUEUE)
    for job_id in ids:
        job = fetch_job(job_id, redis)
        assert job.get_status() == "finished" and len(redis.xrange(f"rq:results:{job_id}")) == 1
        assert JobRecord.from_meta(job.meta).retries == 0  # an outage is not the job's failure
        events = [
            (e[b"event"].decode(), json.loads(e[b"data"])) for _, e in redis.xrange(keys.job_stream(job_id))
        ]
        kinds = [kind for kind, _ in events]
        assert "retry" in kinds and kinds.count("done") == 1 and kinds[-1] == "done"
        assert events[-1][1]["text"] == job.return_value()["text"]
    assert redis.hlen(keys.RUNNING) == 0 and not worker.running
