"""The `batch` priority of a batch's lines: its queues, refused to clients, outside the interactive
backlog, placed after interactive jobs by the scheduler, and held by a worker's batch to `size -
reserved` rows while interactive jobs join at once (a real worker session on tiny-gpt-oss)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis

from api import create_app
from scheduler.loop import Scheduler
from scheduler.tokens import PromptCounter
from shared import decisions, keys
from shared.contract import JobRequest
from shared.heartbeat import WorkerBeat, publish
from shared.jobstore import lifecycle, rqstore
from shared.jobstore.intake import Intake
from shared.jobstore.record import JobRecord
from shared.settings import Settings
from tests.conftest import TINY, FakeClock, schedule_all
from workers import context, fair_share
from workers.kv_budget import KvBudget
from workers.row_intake import RowIntake
from workers.session import BatchSession
from workers.worker import build_worker

SINGLE = keys.SINGLE_QUEUE
LINES = keys.priority_queue(SINGLE, keys.BATCH_PRIORITY)
BODY = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}


def line(redis: Redis, payload: dict, tenant: str = "acme") -> str:
    """A batch's line as the batch feeder makes one: a new job on `incoming:batch`."""
    record = JobRecord(tenant=tenant, priority="batch")
    return lifecycle.enqueue(redis, payload, record, timeout=600, description="line").id


def put(redis: Redis, payload: dict, queue: str, priority: str = "normal") -> str:
    """A job handed to worker queue `queue` as the scheduler hands jobs over."""
    job = rqstore.open_queue(queue, redis).create_job(
        keys.GENERATE_FUNC, args=(payload,), result_ttl=600, failure_ttl=600
    )
    Intake(redis).hand_over(job, JobRecord(tenant="acme", priority=priority), queue)  # type: ignore[arg-type]
    return job.id


# --- the queues and the decisions --------------------------------------------------------------------


def test_batch_is_the_lowest_priority_with_a_queue_per_base() -> None:
    assert keys.PRIORITIES[-1] == keys.BATCH_PRIORITY
    assert keys.BATCH_QUEUES == ("incoming:batch", "gpu-single:batch", "gpu-multi:batch")
    assert keys.queues_by_priority(SINGLE)[-1] == LINES and keys.INCOMING_QUEUES[-1] == "incoming:batch"
    assert set(keys.BATCH_QUEUES) <= set(keys.ALL_QUEUES)  # metrics and the debug bundle show them
    assert not set(keys.BATCH_QUEUES) & set(keys.INTERACTIVE_QUEUES)
    assert keys.fair_base(LINES) == SINGLE  # fair between tenants within the lines too


def test_a_quarter_of_the_slots_is_reserved_for_interactive_jobs() -> None:
    assert [fair_share.reserved_rows(n, None) for n in (1, 2, 4, 8, 16)] == [0, 1, 1, 2, 4]
    assert fair_share.reserved_rows(8, 0) == 0 and fair_share.reserved_rows(8, 3) == 3
    assert fair_share.reserved_rows(8, 20) == 7  # the lines keep one slot: a batch still ends
    assert fair_share.reserved_rows(1, 5) == 0  # nothing to reserve in a batch of one


def test_lines_join_free_slots_only_and_never_the_reserved_ones() -> None:
    # (interactive rows, lines' rows) in a batch of 8 with 2 reserved -> (interactive joins, line joins)
    assert fair_share.joinable(0, 0, 8, 2) == (True, True)
    assert fair_share.joinable(0, 5, 8, 2) == (True, True)
    assert fair_share.joinable(0, 6, 8, 2) == (True, False)  # the lines' limit: size - reserved
    assert fair_share.joinable(3, 4, 8, 2) == (True, True)
    assert fair_share.joinable(4, 4, 8, 2) == (True, False)  # no free slot
    # The lines' rows never count against interactive rows: up to the row limit of the size.
    assert fair_share.joinable(9, 6, 8, 2) == (True, False)
    assert fair_share.joinable(10, 0, 8, 2) == (False, False)
    assert fair_share.joinable(0, 0, 1, 0) == (True, True) and fair_share.joinable(0, 1, 1, 0) == (
        True,
        False,
    )


def test_a_line_leaves_the_kv_cache_room_for_the_reserved_rows() -> None:
    one = JobRequest.model_validate({"prompt": "x"})
    two = JobRequest.model_validate({"prompt": "x", "n": 2})
    assert fair_share.kv_beside(100, one, False, 2) == []
    assert fair_share.kv_beside(100, two, False, 2) == [100]
    assert fair_share.kv_beside(100, one, True, 2) == [100, 100]
    assert fair_share.kv_beside(100, None, True, 1) == [100]


def test_a_line_that_does_not_fit_closes_the_intake_to_lines_only(redis: Redis) -> None:
    intake = RowIntake(redis, "w", [SINGLE, LINES], {}, size=8, reserved=2)
    budget = KvBudget(bytes_per_token=1, budget=7 * 100)  # seven rows of 100 tokens
    assert not intake.fits(budget, [100] * 5, 100, None, line=True)  # 5 + itself + 2 reserved > 7
    assert intake.lines_full
    assert intake.fits(budget, [100] * 5, 100, None, line=False)  # an interactive row still fits
    assert intake.fits(budget, [100] * 4, 100, None, line=True)


def test_an_idle_worker_takes_its_first_job_by_the_same_rule() -> None:
    served = [keys.own_queue("w"), *keys.queues_by_priority(SINGLE)]
    assert fair_share.first_queues(served, 8, fair_share.reserved_rows(8, None)) == served
    assert fair_share.first_queues(served, 4, 4) == served[:-1]  # every slot reserved: no line


def test_reserved_slots_are_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTOSS_BATCH_RESERVED_SLOTS", "3")
    assert Settings().batch_reserved_slots == 3
    with pytest.raises(ValueError):
        Settings(batch_reserved_slots=-1)


# --- the API and admission ---------------------------------------------------------------------------


def test_no_client_may_submit_priority_batch(redis: Redis, settings: Callable[..., Settings]) -> None:
    client = create_app(settings(), redis).test_client()
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for path, body in (("/v1/jobs", BODY), ("/v1/chat/completions", chat), ("/v1/completions", BODY)):
        answer = client.post(path, json={**body, "priority": "batch"})
        assert answer.status_code == 422, path
        error = answer.get_json()["error"]
        assert error["details"][0]["loc"] == ["priority"] and "batch" in error["details"][0]["msg"], path
    assert rqstore.open_queue("incoming:batch", redis).count == 0
    assert client.post("/v1/jobs", json={**BODY, "priority": "low"}).status_code == 202


def test_waiting_lines_do_not_count_in_the_interactive_backlog(
    redis: Redis, settings: Callable[..., Settings]
) -> None:
    for _ in range(3):
        line(redis, BODY)
        put(redis, BODY, LINES, "batch")
    assert lifecycle.waiting_count(redis) == 0
    config = settings(backlog_budget=1, tenant_backlog_budget=1)
    client = create_app(config, redis).test_client()
    assert client.post("/v1/jobs", json=BODY).status_code == 202  # the lines are the batch quota's
    assert client.post("/v1/jobs", json=BODY).status_code == 429  # the interactive one counts


def test_held_lines_are_placed_after_interactive_jobs(
    redis: Redis, settings: Callable[..., Settings], prepared_models: Settings, clock: FakeClock
) -> None:
    config = settings(cache_dir=prepared_models.cache_dir, hold_timeout=60)
    scheduler = Scheduler(config, redis, PromptCounter(config.cache_dir, config.vocab_dir()), clock=clock)
    early = line(redis, BODY)  # arrived first
    client = create_app(config, redis).test_client()
    late = client.post("/v1/jobs", json=BODY).get_json()["id"]
    assert schedule_all(scheduler, redis) == 2  # no live worker: both held
    assert [i.decode() for i in redis.zrange(keys.SCHEDULER_HELD, 0, -1)] == [early, late]
    beat = WorkerBeat(name="w", queue=SINGLE, model=config.model, device="cpu", state="idle", pid=1,
                      host="h", at=clock(), pressure=0.1)  # fmt: skip
    publish(redis, keys.worker_heartbeat("w"), beat, 30)
    scheduler.review_held()
    routes = [d["job_id"] for d in reversed(decisions.recent(redis)) if d["kind"] == "route"]
    assert routes == [late, early]
    assert rqstore.open_queue(LINES, redis).job_ids == [early]
    assert rqstore.open_queue(SINGLE, redis).job_ids == [late]


# --- a real worker session ----------------------------------------------------------------------------


def sentence(topic: str, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": f"Write one sentence about {topic}."}]
    request = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return JobRequest.model_validate(request).model_dump(mode="json")


def test_interactive_jobs_join_a_batch_full_of_lines_at_once(
    settings: Callable[..., Settings], redis: Redis, runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = ("a cat", "the sea", "a robot", "winter", "bread", "a king")
    lines = [put(redis, sentence(t, 16), LINES, "batch") for t in topics]
    interactive: list[str] = []
    seen: list[tuple[list[str], int]] = []  # after each look for jobs: the rows' priorities, lines queued
    joined_at: list[set[str]] = []  # the lines decoding when the interactive jobs joined
    original = BatchSession._take_more

    def look(session: BatchSession) -> None:
        rows = [s.run.record.priority for s in session.slots.values()]
        seen.append((rows, redis.llen(rqstore.queue_key(LINES))))

    def take_more(session: BatchSession) -> list[Any]:
        joining = original(session)
        look(session)
        if seen[-1][0] == ["batch"] * 3 and not interactive:  # the lines' limit reached: two arrive now
            interactive.extend(put(redis, sentence(t, 4), SINGLE) for t in ("music", "the moon"))
            joined_at.append(set(session.slots))
            joining += original(session)
            look(session)
        return joining

    monkeypatch.setattr(BatchSession, "_take_more", take_more)
    # A batch of 4, one slot reserved: the lines hold 3 rows at most.
    config = settings(model=TINY, observability=False, max_batch_size=4, batch_reserved_slots=1)
    worker, _ = build_worker(config, redis, "cpu")
    context.bind(runtime, worker.name, SINGLE)
    worker.activity = "idle"
    worker.work(burst=True, logging_level=None)

    assert interactive, "the lines never held their limit of three rows"
    full = seen.index((["batch"] * 3, 3))  # a slot free, three lines waiting: none took it
    # Both joined the batch at once, beside the three lines: the lines' rows do not count against them.
    assert sorted(seen[full + 1][0]) == ["batch"] * 3 + ["normal"] * 2 and seen[full + 1][1] == 3
    assert max(rows.count("batch") for rows, _ in seen) == 3  # never more than size - reserved
    stamps = {i: rqstore.fetch_job(i, redis).meta["timestamps"] for i in [*lines, *interactive]}
    ahead = joined_at[0]
    assert len(ahead) == 3
    for job_id in interactive:  # started before any line ahead of it finished
        assert stamps[job_id]["started"] < min(stamps[i]["finished"] for i in ahead)
    assert all(rqstore.fetch_job(i, redis).get_status() == "finished" for i in stamps)
    assert redis.hlen(keys.RUNNING) == 0
