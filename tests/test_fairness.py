"""Weighted fair sharing between tenants: the fair take (start-time fair queuing within a priority
queue, in one Lua script on a real Redis, jobs enqueued as the scheduler and RQ enqueue them), the
arithmetic of fair batch slots, and a real worker session letting a light tenant's job into a batch
full of another tenant's rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis
from rq.job import Job

from shared import keys
from shared.contract import JobRequest
from shared.jobstore import fair_queue, rqstore, runs
from shared.jobstore.intake import Intake
from shared.jobstore.record import JobRecord
from shared.settings import Settings
from tests.conftest import TINY
from workers import context, fair_share
from workers.session import BatchSession
from workers.worker import build_worker

SINGLE = keys.SINGLE_QUEUE
HIGH = keys.priority_queue(SINGLE, "high")
OWN = keys.own_queue("w")
SERVED = [OWN, *keys.queues_by_priority(SINGLE)]
"""A worker's queues, in the order it serves them."""


def put(redis: Redis, tenant: str | None, queue: str = SINGLE, body: dict | None = None) -> str:
    """A job of `tenant` handed to `queue` as the scheduler hands jobs over (its tenant noted)."""
    job = rqstore.open_queue(queue, redis).create_job(
        keys.GENERATE_FUNC, args=(body or {"prompt": "x"},), result_ttl=600, failure_ttl=600
    )
    Intake(redis).hand_over(job, JobRecord(tenant=tenant), queue)
    return job.id


def put_by_rq(redis: Redis, tenant: str | None, queue: str = SINGLE, body: dict | None = None) -> str:
    """A job of `tenant` put on `queue` by RQ itself (nothing noted: its record tells the tenant)."""
    meta = JobRecord(tenant=tenant).to_meta() if tenant else None
    queued = rqstore.open_queue(queue, redis)
    return queued.enqueue(keys.GENERATE_FUNC, body or {"prompt": "x"}, result_ttl=600, meta=meta).id


def take(redis: Redis, queues: list[str] | None = None, **options: Any) -> tuple[Job, str] | None:
    return runs.take(redis, "w", queues or SERVED, **options)


def tenant(taken: tuple[Job, str] | None) -> str:
    assert taken is not None
    return JobRecord.from_meta(taken[0].meta).tenant_or_default


def drain(redis: Redis, count: int, **options: Any) -> list[str]:
    """Ids of the next `count` jobs taken."""
    ids = []
    for _ in range(count):
        taken = take(redis, **options)
        assert taken is not None
        ids.append(taken[0].id)
    return ids


# --- the fair take ------------------------------------------------------------------------------------


def test_the_take_serves_the_tenant_most_behind_and_each_tenant_in_order(redis: Redis) -> None:
    flood = [put(redis, "flood") for _ in range(3)] + [put_by_rq(redis, "flood")]
    light = [put(redis, "light"), put_by_rq(redis, "light")]
    order = drain(redis, 6)
    assert order == [flood[0], light[0], flood[1], light[1], flood[2], flood[3]]
    assert take(redis) is None
    # Every job went into the running ledger as it left its queue; the noted tenants left with them.
    assert set(redis.hkeys(keys.RUNNING)) == {i.encode() for i in order}
    assert not redis.exists(keys.queued_tenants(SINGLE))


def test_a_tenant_joining_a_flood_waits_behind_none_of_it(redis: Redis) -> None:
    flood = [put(redis, "flood") for _ in range(20)]
    drain(redis, 5)
    late = put(redis, "light")
    assert take(redis)[0].id == late  # type: ignore[index]
    assert take(redis)[0].id == flood[5]  # type: ignore[index]


def test_weights_share_the_takes_in_their_proportion(redis: Redis) -> None:
    for _ in range(12):
        put(redis, "acme")
    for _ in range(12):
        put_by_rq(redis, "free")
    taken = [take(redis, weights={"acme": 3}) for _ in range(16)]
    assert Counter(tenant(t) for t in taken) == {"acme": 12, "free": 4}


def test_priority_comes_before_fairness(redis: Redis) -> None:
    for _ in range(3):
        put(redis, "flood")
    drain(redis, 2)  # flood is ahead of light now
    light = put(redis, "light")
    urgent = put(redis, "flood", HIGH)
    assert [t[0].id for t in (take(redis), take(redis))] == [urgent, light]  # type: ignore[index]


def test_the_own_queue_keeps_arrival_order(redis: Redis) -> None:
    for _ in range(3):
        put(redis, "flood")
    drain(redis, 2)
    own = [put(redis, "flood", OWN), put(redis, "flood", OWN), put(redis, "light", OWN)]
    assert drain(redis, 3) == own
    again = [put(redis, "flood", OWN), put(redis, "light", OWN)]
    assert drain(redis, 1, skip_tenants={"flood"}) == [again[1]]  # the first it may take
    assert drain(redis, 1) == [again[0]]


def test_skipped_tenants_get_no_job(redis: Redis) -> None:
    a1, a2, b1 = put(redis, "a"), put(redis, "a"), put_by_rq(redis, "b")
    assert drain(redis, 1, skip_tenants={"b"}) == [a1]
    assert drain(redis, 1, skip_tenants={"a"}) == [b1]
    assert take(redis, skip_tenants={"a"}) is None and take(redis, skip_tenants={"a", "b"}) is None
    assert rqstore.open_queue(SINGLE, redis).job_ids == [a2]
    # A skipped tenant's job in a higher priority queue lets the next queue give one.
    c1 = put(redis, "c")
    put(redis, "a", HIGH)
    assert drain(redis, 1, skip_tenants={"a"}) == [c1]


def test_jobs_deleted_while_queued_are_dropped(redis: Redis) -> None:
    noted, unnoted = put(redis, "a"), put_by_rq(redis, "a")
    kept = put_by_rq(redis, "b")
    redis.delete(rqstore.job_key(noted), rqstore.job_key(unnoted))
    taken = take(redis)
    assert taken is not None and taken[0].id == kept
    assert take(redis) is None
    assert redis.hkeys(keys.RUNNING) == [kept.encode()]
    assert not redis.exists(rqstore.queue_key(SINGLE), keys.queued_tenants(SINGLE))


def test_jobs_without_a_tenant_are_the_default_tenants(redis: Redis) -> None:
    first, second, other = put_by_rq(redis, None), put_by_rq(redis, None), put(redis, "acme")
    assert fair_queue.waiting_tenants(redis, SERVED) == {keys.DEFAULT_TENANT, "acme"}
    assert drain(redis, 3) == [first, other, second]


def test_waiting_tenants_are_read_from_every_queue(redis: Redis) -> None:
    assert fair_queue.waiting_tenants(redis, SERVED) == set()
    put(redis, "a", HIGH)
    put_by_rq(redis, "b")
    put(redis, "c", OWN)
    assert fair_queue.waiting_tenants(redis, SERVED) == {"a", "b", "c"}
    assert fair_queue.waiting_tenants(redis, [SINGLE]) == {"b"}


def test_every_enqueue_on_a_worker_queue_notes_its_tenant(redis: Redis) -> None:
    job_id = put(redis, "acme")
    assert redis.hget(keys.queued_tenants(SINGLE), job_id) == b"acme"
    assert 0 < redis.ttl(keys.queued_tenants(SINGLE)) <= keys.FAIR_TTL
    back = rqstore.open_queue(keys.INCOMING_QUEUE, redis).create_job(keys.GENERATE_FUNC, args=({},))
    pipe = redis.pipeline()
    rqstore.enqueue(back, keys.INCOMING_QUEUE, pipe)  # the scheduler takes incoming in order
    pipe.execute()
    assert not redis.exists(keys.queued_tenants(keys.INCOMING_QUEUE))


# --- settings and the share arithmetic ----------------------------------------------------------------


def test_tenant_weights_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTOSS_TENANT_WEIGHTS", "acme=3, free=0.5")
    assert Settings().tenant_weights == {"acme": 3.0, "free": 0.5}
    monkeypatch.delenv("GPTOSS_TENANT_WEIGHTS")
    assert Settings().tenant_weights == {}
    for bad in ("acme", "=2", "acme=0", "acme=-1", "acme=x", "acme=inf"):
        with pytest.raises(ValueError):
            Settings(tenant_weights=bad)


def test_the_row_limit_lets_a_quarter_more_join_and_none_without_batching() -> None:
    assert [fair_share.row_limit(n) for n in (1, 2, 4, 8, 16)] == [1, 3, 5, 10, 20]


def test_shares_follow_the_weights_of_tenants_holding_or_waiting() -> None:
    assert fair_share.shares([], {"a"}, {}, 16) == {"a": 16}
    assert fair_share.shares(["a"] * 10, {"b"}, {}, 16) == {"a": 8, "b": 8}
    assert fair_share.shares(["a"], {"b"}, {"a": 3}, 16) == {"a": 12, "b": 4}
    assert fair_share.shares(["a", "c"], set(), {"x": 9}, 4) == {"a": 2, "c": 2}


def test_a_tenant_at_its_share_takes_no_more_but_alone_fills_the_batch() -> None:
    assert fair_share.at_share(["a"] * 15, {"a"}, {}, 16) == set()
    assert fair_share.at_share(["a"] * 16, {"a"}, {}, 16) == {"a"}
    assert fair_share.at_share(["a"] * 16, {"a", "b"}, {}, 16) == {"a"}
    assert fair_share.at_share(["a"] * 8 + ["b"] * 7, {"a", "b"}, {}, 16) == {"a"}
    assert fair_share.at_share(["a"] * 11 + ["b"] * 4, {"a", "b"}, {"a": 3}, 16) == {"b"}
    assert fair_share.at_share(["a"] * 5 + ["b"] * 5 + ["c"] * 5, {"c"}, {}, 16) == set()


# --- a real worker session ----------------------------------------------------------------------------


def test_a_light_tenants_job_joins_a_batch_full_of_another_tenants_rows(
    settings: Callable[..., Settings], redis: Redis, runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def body(topic: str) -> dict:
        messages = [{"role": "user", "content": f"Write one sentence about {topic}."}]
        return JobRequest.model_validate(
            {"messages": messages, "max_tokens": 12, "temperature": 0}
        ).model_dump(mode="json")

    flood = [
        put(redis, "flood", body=body(t))
        for t in ("a cat", "the sea", "a robot", "winter", "bread", "a king")
    ]
    light: list[str] = []
    seen: list[tuple[list[str], int]] = []  # after each look for jobs: the tenants of the rows, jobs queued
    original = BatchSession._take_more

    def take_more(session: BatchSession) -> list[Any]:
        joining = original(session)
        rows = [s.run.record.tenant_or_default for s in session.slots.values()]
        seen.append((rows, redis.llen(rqstore.queue_key(SINGLE))))
        if rows == ["flood"] * 4 and not light:  # the batch is full of flood: light arrives now
            light.append(put(redis, "light", body=body("music")))
            joining += original(session)
            seen.append(([s.run.record.tenant_or_default for s in session.slots.values()],
                         redis.llen(rqstore.queue_key(SINGLE))))  # fmt: skip
        return joining

    monkeypatch.setattr(BatchSession, "_take_more", take_more)
    worker, _ = build_worker(settings(model=TINY, observability=False, max_batch_size=4), redis, "cpu")
    context.bind(runtime, worker.name, SINGLE)
    worker.activity = "idle"
    worker.work(burst=True, logging_level=None)

    assert light, "the batch never held four rows of the flooding tenant"
    full = seen.index((["flood"] * 4, 2))
    # Light joined the full batch at once, as a fifth row; flood's other two jobs still waited.
    assert sorted(seen[full + 1][0]) == ["flood"] * 4 + ["light"] and seen[full + 1][1] == 2
    assert max(len(rows) for rows, _ in seen) == 5  # the row limit of a batch of 4
    jobs = {i: rqstore.fetch_job(i, redis) for i in [*flood, *light]}
    assert all(j.get_status() == "finished" for j in jobs.values())
    assert redis.hlen(keys.RUNNING) == 0
