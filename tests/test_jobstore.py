"""The job store's lifecycle operations against a real Redis, each also cut short by a crash before
any one of its Redis round trips: after the crash and the recovery the system runs (a scheduler's
restart, the reaper), the job is in exactly one place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.client
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import SimpleWorker

from scheduler.reaper import Reaper
from shared import keys
from shared.jobstore import events, lifecycle, rqstore, runs
from shared.jobstore.intake import Intake
from shared.jobstore.ledger import running
from shared.jobstore.record import SCHEMA_VERSION, JobRecord

RESULT = {"text": "hi", "finish_reason": "stop", "model": "m", "worker": "w", "queue": "gpu-single",
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip


class Crash(RedisConnectionError):
    """The injected crash: the process died before this round trip."""


class Crasher:
    """Counts Redis round trips while armed, and raises Crash before the one numbered `at`."""

    def __init__(self) -> None:
        self.calls, self.at, self.armed = 0, 0, False

    def tick(self) -> None:
        if not self.armed:
            return
        self.calls += 1
        if self.calls == self.at:
            raise Crash(f"crash injected before round trip {self.at}")

    def run(self, at: int, operation: Callable[[], Any]) -> bool:
        """Run `operation`, crashing before round trip `at` (0: never); True when it crashed."""
        self.calls, self.at, self.armed = 0, at, True
        try:
            operation()
            return False
        except Crash:
            return True
        finally:
            self.armed = False


@pytest.fixture
def crasher(monkeypatch: pytest.MonkeyPatch) -> Iterator[Crasher]:
    """Every Redis round trip of this process (plain commands, pipelines) passes the crasher."""
    crash = Crasher()
    plain, immediate, execute = (
        redis.client.Redis._execute_command,
        redis.client.Pipeline.immediate_execute_command,
        redis.client.Pipeline.execute,
    )

    def _plain(self: Any, *args: Any, **options: Any) -> Any:
        crash.tick()
        return plain(self, *args, **options)

    def _immediate(self: Any, *args: Any, **options: Any) -> Any:
        crash.tick()
        return immediate(self, *args, **options)

    def _execute(self: Any, *args: Any, **options: Any) -> Any:
        crash.tick()
        return execute(self, *args, **options)

    monkeypatch.setattr(redis.client.Redis, "_execute_command", _plain)
    monkeypatch.setattr(redis.client.Pipeline, "immediate_execute_command", _immediate)
    monkeypatch.setattr(redis.client.Pipeline, "execute", _execute)
    yield crash


def places(redis: Redis, job_id: str) -> list[str]:
    """Every place `job_id` is in: a queue, RQ's intermediate lists, the scheduler's in-flight list or
    held set, the running ledger, or ended (RQ's terminal statuses). A job that exists is in one."""
    found = []
    for raw in redis.scan_iter("rq:queue:*"):
        key = raw.decode()
        if redis.type(key) == b"list" and job_id.encode() in redis.lrange(key, 0, -1):
            found.append(key)
    if job_id.encode() in redis.lrange(keys.SCHEDULER_INFLIGHT, 0, -1):
        found.append("inflight")
    if redis.zscore(keys.SCHEDULER_HELD, job_id) is not None:
        found.append("held")
    if redis.hexists(keys.RUNNING, job_id):
        found.append("running")
    job = lifecycle.fetch(redis, job_id)
    status = job.get_status(refresh=True) if job is not None else None
    if status in rqstore.TERMINAL:
        found.append(f"ended:{getattr(status, 'value', status)}")
    return found


def submit(redis: Redis, priority: str = "normal") -> str:
    """A job on `incoming`, as the API enqueues it."""
    record = JobRecord(model="m", tenant="t", priority=priority)  # type: ignore[arg-type]
    record.stamp("received")
    return str(lifecycle.enqueue(redis, {"prompt": "x"}, record, timeout=60, description="generate m").id)


def routed(redis: Redis) -> str:
    """A job the scheduler handed to gpu-single."""
    job_id = submit(redis)
    intake = Intake(redis)
    job = intake.take(0.1)
    assert job is not None
    intake.hand_over(job, lifecycle.read(job), keys.priority_queue(keys.SINGLE_QUEUE, "normal"))
    return job_id


def dead_worker(redis: Redis) -> SimpleWorker:
    """An RQ worker object that serves gpu-single and never heartbeats (so it counts as dead)."""
    queues = [rqstore.open_queue(q, redis) for q in keys.queues_by_priority(keys.SINGLE_QUEUE)]
    return SimpleWorker(queues, connection=redis, name="w-dead", serializer=rqstore.SERIALIZER)


def sweep(redis: Redis) -> dict[str, str]:
    """The reaper's sweep (no worker heartbeats, so every ledger entry is a dead worker's)."""
    return Reaper(redis, max_retries=5, settle=0).sweep()


# --- the record ------------------------------------------------------------------------------------


def test_a_record_of_the_previous_schema_reads_and_keeps_unknown_fields() -> None:
    old = {"request_id": "r", "model": "m", "timestamps": {"received": 1.0}, "route": None,
           "retries": 2, "error": {"code": "x", "message": "y"}}  # fmt: skip
    record = JobRecord.from_meta(old)
    assert (record.schema_version, record.retries, record.attempt, record.error.code) == (1, 2, 0, "x")  # type: ignore[union-attr]
    assert record.to_meta()["schema"] == SCHEMA_VERSION
    newer = JobRecord.from_meta({"schema": SCHEMA_VERSION + 1, "model": "m", "added_later": {"a": 1}})
    assert newer.to_meta()["added_later"] == {"a": 1} and newer.to_meta()["schema"] == SCHEMA_VERSION + 1


def test_a_record_is_validated_on_read() -> None:
    with pytest.raises(ValueError):
        JobRecord.from_meta({"priority": "urgent"})
    with pytest.raises(ValueError):
        JobRecord.from_meta({"timestamps": {"received": "yesterday"}})


def test_rq_is_the_release_the_store_follows() -> None:
    import rq

    assert rqstore.rq_matches(), (
        f"shared/jobstore/rqstore.py follows rq {rqstore.RQ_VERSION}, not {rq.__version__}"
    )


# --- each operation, whole and crashed ------------------------------------------------------------


def test_enqueue_and_hand_over(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 12):
        redis.flushall()
        job_id = submit(redis)
        intake = Intake(redis)
        job = intake.take(0.1)
        assert job is not None and places(redis, job_id) == ["inflight"]
        record = lifecycle.read(job)
        target = keys.priority_queue(keys.SINGLE_QUEUE, "normal")
        crashed = crasher.run(at, lambda: intake.hand_over(job, record, target))  # noqa: B023
        Intake(redis).recover()  # the next scheduler
        where = places(redis, job_id)
        assert len(where) == 1 and where[0] in ("rq:queue:incoming", f"rq:queue:{target}"), (at, where)
        if not crashed:
            assert where == [f"rq:queue:{target}"]
            break


def test_hold_and_end_unrouted(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 30):
        redis.flushall()
        job_id = submit(redis)
        intake = Intake(redis)
        job = intake.take(0.1)
        assert job is not None
        record = lifecycle.read(job)

        def hold_then_reject() -> None:
            intake.hold(job, record, 1.0)  # noqa: B023
            intake.end_unrouted(job, record, "rejected", "hold_expired", "Nothing could take it.")  # noqa: B023

        crashed = crasher.run(at, hold_then_reject)
        Intake(redis).recover()
        where = places(redis, job_id)
        assert len(where) == 1, (at, where)
        if not crashed:
            assert where == ["ended:canceled"]
            stored = lifecycle.reload(rqstore.fetch_job(job_id, redis))
            assert stored.rejected is not None and stored.rejected.code == "hold_expired"
            assert redis.zcard(keys.tenant_backlog("t")) == 0 and redis.ttl(rqstore.job_key(job_id)) > 0
            break


def test_cancel_a_waiting_job(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 40):
        redis.flushall()
        job_id = routed(redis)
        job = rqstore.fetch_job(job_id, redis)
        ended: list[Any] = []
        crashed = crasher.run(at, lambda: ended.append(lifecycle.cancel(redis, job, "Cancelled.")))  # noqa: B023
        where = places(redis, job_id)
        assert len(where) == 1, (at, where)
        if not crashed:
            assert (
                where == ["ended:canceled"]
                and ended[0] is not None
                and ended[0].cancelled.code == "job_cancelled"
            )
            break


def test_cancel_leaves_a_started_job_to_its_worker(redis: Redis) -> None:
    job_id = routed(redis)
    worker = dead_worker(redis)
    taken = runs.take(redis, worker.name, [q.name for q in worker.queues])
    assert taken is not None
    job, queue = taken
    runs.start(redis, worker, job, lifecycle.read(job), queue)
    assert lifecycle.cancel(redis, rqstore.fetch_job(job_id, redis), "Cancelled.") is None
    assert places(redis, job_id) == ["running"]


def test_take_and_start(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 40):
        redis.flushall()
        job_id = routed(redis)
        worker = dead_worker(redis)

        def take_and_start() -> None:
            taken = runs.take(redis, worker.name, [q.name for q in worker.queues])  # noqa: B023
            assert taken is not None
            job, queue = taken
            runs.start(redis, worker, job, lifecycle.read(job), queue)  # noqa: B023

        crashed = crasher.run(at, take_and_start)
        where = places(redis, job_id)
        assert len(where) == 1 and where[0] in ("running", "rq:queue:gpu-single"), (at, where)
        if not crashed:
            job = rqstore.fetch_job(job_id, redis)
            assert job.get_status() == "started" and lifecycle.read(job).attempt == 1
            assert runs.attempt(redis, job_id) == 1 and running(redis)[job_id].worker == "w-dead"
            break
        sweep(redis)  # the worker is dead: the reaper hands back whatever it held
        assert places(redis, job_id) == ["rq:queue:gpu-single"], at


def test_hand_back_and_fail_after_the_last_retry(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 40):
        redis.flushall()
        job_id = routed(redis)
        worker = dead_worker(redis)
        taken = runs.take(redis, worker.name, [q.name for q in worker.queues])
        assert taken is not None
        runs.start(redis, worker, taken[0], lifecycle.read(taken[0]), taken[1])
        crashed = crasher.run(at, lambda: sweep(redis))  # noqa: B023
        where = places(redis, job_id)
        assert len(where) == 1 and where[0] in ("running", "rq:queue:gpu-single"), (at, where)
        if not crashed:
            assert where == ["rq:queue:gpu-single"]
            kinds = [f[b"event"] for _, f in redis.xrange(keys.job_stream(job_id))]
            assert kinds == [events.RETRY.encode()]
            assert lifecycle.read(rqstore.fetch_job(job_id, redis)).retries == 1
            break
    # Out of retries: failed, with its reason, once.
    taken = runs.take(redis, worker.name, [q.name for q in worker.queues])
    assert taken is not None
    runs.start(redis, worker, taken[0], lifecycle.read(taken[0]), taken[1])
    assert lifecycle.hand_back(redis, job_id, "lost", max_retries=1) == "failed"
    assert lifecycle.hand_back(redis, job_id, "lost", max_retries=1) == "gone"
    assert places(redis, job_id) == ["ended:failed"]
    assert lifecycle.reload(rqstore.fetch_job(job_id, redis)).error.code == "worker_lost"  # type: ignore[union-attr]


def test_release_own_queue(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 30):
        redis.flushall()
        job_id = submit(redis, "high")
        intake = Intake(redis)
        job = intake.take(0.1)
        assert job is not None
        intake.hand_over(job, lifecycle.read(job), keys.own_queue("w1"))
        crashed = crasher.run(at, lambda: lifecycle.release_own_queue(redis, "w1"))
        where = places(redis, job_id)
        assert len(where) == 1 and where[0] in ("rq:queue:worker:w1", "rq:queue:incoming:high"), (at, where)
        if not crashed:
            assert where == ["rq:queue:incoming:high"]
            break


def test_create_finished(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 12):
        redis.flushall()
        record = JobRecord(model="m", tenant="t")
        record.stamp("received")
        made: list[Any] = []
        crashed = crasher.run(
            at,
            lambda: made.append(lifecycle.create_finished(redis, {"prompt": "x"}, record, RESULT, "cached")),  # noqa: B023
        )
        ids = [raw.decode().split(":")[-1] for raw in redis.scan_iter("rq:job:*")]
        for job_id in ids:
            assert places(redis, job_id) == ["ended:finished"], at
        if not crashed:
            job = made[0]
            assert rqstore.fetch_job(job.id, redis).return_value() == RESULT
            kinds = [f[b"event"] for _, f in redis.xrange(keys.job_stream(job.id))]
            assert kinds == [b"start", b"token", b"done"]
            break


# --- fenced runs: a worker that was replaced cannot write ------------------------------------------


def started_run(redis: Redis, job_id: str, worker: SimpleWorker) -> tuple[Any, Any, Any, JobRecord]:
    """Take `job_id` and start a run of it on `worker`: (job, queue, execution, record)."""
    taken = runs.take(redis, worker.name, [q.name for q in worker.queues])
    assert taken is not None and taken[0].id == job_id
    job, queue_name = taken
    record = lifecycle.read(job)
    execution = runs.start(redis, worker, job, record, queue_name)
    return job, rqstore.open_queue(queue_name, redis), execution, record


def test_a_replaced_run_writes_nothing_and_the_job_has_one_result(redis: Redis) -> None:
    job_id = routed(redis)
    paused = dead_worker(redis)
    job_a, queue_a, execution_a, record_a = started_run(redis, job_id, paused)
    fence_a = runs.fence_of(job_a, record_a.attempt)
    stream_a = events.JobStream(redis, job_id, fence=fence_a)
    stream_a.text("final", "Hel")
    assert not stream_a.superseded
    assert sweep(redis) == {job_id: "requeued"}  # paused past its lease: the reaper hands it back
    fresh = SimpleWorker(paused.queues, connection=redis, name="w-fresh", serializer=rqstore.SERIALIZER)
    job_b, queue_b, execution_b, record_b = started_run(redis, job_id, fresh)
    assert record_b.attempt > record_a.attempt
    fence_b = runs.fence_of(job_b, record_b.attempt)
    stream_b = events.JobStream(redis, job_id, fence=fence_b)
    stream_b.text("final", "Hello")

    # The paused worker comes back: its token event, its record and its result are all refused.
    stream_a.text("final", "lo there")
    assert stream_a.superseded
    assert not runs.write_record(redis, job_a, record_a, fence_a)
    done_a = stream_a.ending(*runs.done_event(RESULT, record_a))
    assert (
        runs.settle(redis, paused, (job_a, queue_a, execution_a), record_a, fence_a, done_a, result=RESULT)
        == "superseded"
    )
    assert runs.write_record(redis, job_b, record_b, fence_b)
    result_b = {**RESULT, "text": "Hello"}
    done_b = stream_b.ending(*runs.done_event(result_b, record_b))
    assert (
        runs.settle(redis, fresh, (job_b, queue_b, execution_b), record_b, fence_b, done_b, result=result_b)
        == "settled"
    )

    assert rqstore.result_count(job_id, redis) == 1
    assert rqstore.fetch_job(job_id, redis).return_value() == result_b
    kinds = [f[b"event"].decode() for _, f in redis.xrange(keys.job_stream(job_id))]
    assert kinds == ["token", "retry", "token", "done"]
    assert places(redis, job_id) == ["ended:finished"]
    assert lifecycle.reload(rqstore.fetch_job(job_id, redis)).attempt == record_b.attempt


def test_settling_and_its_terminal_event_are_one_step(redis: Redis, crasher: Crasher) -> None:
    for at in range(1, 20):
        redis.flushall()
        job_id = routed(redis)
        worker = dead_worker(redis)
        job, queue, execution, record = started_run(redis, job_id, worker)
        fence = runs.fence_of(job, record.attempt)
        stream = events.JobStream(redis, job_id, fence=fence)

        def settle() -> None:
            ending = stream.ending(*runs.done_event(RESULT, record))  # noqa: B023
            runs.settle(redis, worker, (job, queue, execution), record, fence, ending, result=RESULT)  # noqa: B023

        crashed = crasher.run(at, settle)
        kinds = [f[b"event"] for _, f in redis.xrange(keys.job_stream(job_id))]
        if crashed:
            assert places(redis, job_id) == ["running"] and b"done" not in kinds, at
            continue
        assert places(redis, job_id) == ["ended:finished"] and kinds == [b"done"]
        assert rqstore.fetch_job(job_id, redis).return_value() == RESULT
        break


# --- what a client sees across runs ---------------------------------------------------------------


def relayed(*raw: tuple[str, dict]) -> list[tuple[str, dict]]:
    relay = events.AttemptRelay()
    out = []
    for n, (kind, data) in enumerate(raw):
        out += [(e.kind, e.data) for e in relay.feed(events.JobEvent(kind, data, f"{n + 1}-0"))]
    return out


def tok(text: str, channel: str = "final") -> tuple[str, dict]:
    return events.TOKEN, {"channel": channel, "text": text, "index": 0}


def test_a_new_run_that_repeats_the_text_continues_it() -> None:
    done = (events.DONE, {"text": "The days are Monday"})
    out = relayed((events.START, {}), tok("The days"), (events.RETRY, {}), (events.START, {}),
                  tok("The"), tok(" days are"), tok(" Monday"), done)  # fmt: skip
    texts = "".join(d["text"] for k, d in out if k == events.TOKEN)
    assert texts == "The days are Monday"
    assert [k for k, _ in out] == [events.START, events.TOKEN, events.TOKEN, events.TOKEN, events.DONE]


def test_a_new_run_that_differs_ends_the_stream_with_an_error() -> None:
    out = relayed((events.START, {}), tok("The days"), (events.RETRY, {}), (events.START, {}), tok("A week"))
    assert out[-1] == (events.ERROR, {"code": events.DIVERGED, "message": out[-1][1]["message"]})
    assert "".join(d["text"] for k, d in out if k == events.TOKEN) == "The days"


def test_a_new_run_that_stops_short_or_changes_channel_early_diverges() -> None:
    short = relayed((events.START, {}), tok("The days"), (events.RETRY, {}), tok("The"), (events.DONE, {}))
    assert short[-1][0] == events.ERROR and short[-1][1]["code"] == events.DIVERGED
    early = relayed(tok("think", "analysis"), (events.RETRY, {}), tok("th", "analysis"), tok("Hi"))
    assert early[-1][0] == events.ERROR and early[-1][1]["code"] == events.DIVERGED
