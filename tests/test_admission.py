"""Admission: the API's bounded backlog (429 + Retry-After) and the scheduler's holds, on a real Redis."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from api import create_app
from scheduler.loop import Scheduler
from scheduler.tokens import PromptCounter
from shared import keys
from shared.drain import (
    RETRY_AFTER_MAX,
    RETRY_AFTER_UNKNOWN,
    drain_rate,
    leave_backlog,
    record_done,
    retry_after,
)
from shared.heartbeat import WorkerBeat, publish
from shared.jobstore.intake import Intake
from shared.jobstore.rqstore import open_queue
from shared.registry import model_spec
from tests.conftest import FakeClock

BODY = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}


def test_retry_after_follows_the_drain_rate() -> None:
    assert retry_after(10, 2.0) == 5
    assert retry_after(1, 100.0) == 1
    assert retry_after(10_000, 0.01) == RETRY_AFTER_MAX
    assert retry_after(3, 0.0) == RETRY_AFTER_UNKNOWN


def test_drain_rate_counts_recent_ends(redis: Redis) -> None:
    now = time.time()
    for i in range(30):
        record_done(redis, f"job-{i}", now - i)  # 30 jobs over the last 30 s
    record_done(redis, "old", now - 200)
    assert drain_rate(redis, now, window=60) == pytest.approx(30 / 60)
    assert redis.ttl(keys.DRAINED) > 0


def test_backlog_over_budget_is_429_and_creates_nothing(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(backlog_budget=3), redis).test_client()
    for _ in range(3):
        assert client.post("/v1/jobs", json=BODY).status_code == 202
    refused = client.post("/v1/jobs", json=BODY)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "backlog_full"
    assert refused.headers["Retry-After"] == str(RETRY_AFTER_UNKNOWN)  # nothing drained yet
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 3

    now = time.time()
    for i in range(12):
        record_done(redis, f"done-{i}", now - i)  # 0.2 jobs/s over the last minute
    assert client.post("/v1/jobs", json=BODY).headers["Retry-After"] == "5"  # 1 excess job / 0.2 per s
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'gptoss_admission_decisions_total{outcome="refused",reason="backlog_full"} 2.0' in metrics


def test_held_jobs_count_towards_the_backlog(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(backlog_budget=1), redis).test_client()
    redis.zadd(keys.SCHEDULER_HELD, {"some-held-job": time.time()})
    assert client.post("/v1/jobs", json=BODY).status_code == 429


@pytest.fixture
def scheduler_for(redis: Redis, settings, prepared_models, clock: FakeClock):  # type: ignore[no-untyped-def]
    """A scheduler on the test's clock and an API client, with settings overridden."""

    def make(**overrides: object) -> tuple[Scheduler, object]:
        config = settings(cache_dir=prepared_models.cache_dir, **overrides)
        counter = PromptCounter(config.cache_dir, config.vocab_dir())
        counter.tokenizer(model_spec(config.model))
        return Scheduler(config, redis, counter, clock=clock), create_app(config, redis).test_client()

    return make


def _beat(queue: str, pressure: float) -> WorkerBeat:
    return WorkerBeat(name=f"w-{queue}", queue=queue, model="smollm2-135m", device="cpu", state="idle",
                      pid=1, host="h", at=time.time(), pressure=pressure)  # fmt: skip


def test_no_live_worker_holds_then_rejects_after_the_deadline(redis: Redis, scheduler_for, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, client = scheduler_for(hold_timeout=0.5)
    job_id = client.post("/v1/jobs", json=BODY).get_json()["id"]
    # The scheduler's clock starts at the job's arrival (stamped before the API read its body: the
    # first request of a fresh app may take longer than the hold timeout to answer).
    clock.now = client.get(f"/v1/jobs/{job_id}").get_json()["timestamps"]["received"]
    scheduler.schedule(Intake(redis).take(0.1))  # type: ignore[arg-type]
    view = client.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "held"
    assert view["held"] == {"code": "no_live_worker", "message": "No live worker serves gpu-single."}
    assert redis.zrange(keys.SCHEDULER_HELD, 0, -1) == [job_id.encode()]
    scheduler.review_held()
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "held"  # still inside the deadline
    clock.advance(0.6)
    scheduler.review_held()
    view = client.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "rejected" and view["error"]["code"] == "hold_expired"
    assert "No live worker" in view["error"]["message"] and "held" not in view
    assert redis.zcard(keys.SCHEDULER_HELD) == 0


def test_held_job_is_released_when_a_worker_appears(redis: Redis, scheduler_for) -> None:  # type: ignore[no-untyped-def]
    scheduler, client = scheduler_for(hold_timeout=60)
    publish(redis, keys.worker_heartbeat("s"), _beat(keys.SINGLE_QUEUE, 0.99), 30)
    job_id = client.post("/v1/jobs", json=BODY).get_json()["id"]
    scheduler.schedule(Intake(redis).take(0.1))  # type: ignore[arg-type]
    assert client.get(f"/v1/jobs/{job_id}").get_json()["held"]["code"] == "memory_critical"
    publish(redis, keys.worker_heartbeat("s"), _beat(keys.SINGLE_QUEUE, 0.5), 30)
    scheduler.review_held()
    view = client.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "scheduled" and view["route"]["queue"] == keys.SINGLE_QUEUE
    assert open_queue(keys.SINGLE_QUEUE, redis).job_ids == [job_id]
    assert redis.zcard(keys.SCHEDULER_HELD) == 0


def test_held_jobs_survive_a_scheduler_restart(redis: Redis, scheduler_for) -> None:  # type: ignore[no-untyped-def]
    first, client = scheduler_for(hold_timeout=60)
    job_id = client.post("/v1/jobs", json=BODY).get_json()["id"]
    first.schedule(Intake(redis).take(0.1))  # type: ignore[arg-type]
    second, _ = scheduler_for(hold_timeout=60)  # a new process: state comes from Redis only
    publish(redis, keys.worker_heartbeat("s"), _beat(keys.SINGLE_QUEUE, 0.1), 30)
    second.review_held()
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "scheduled"


def test_a_tenant_over_its_own_budget_is_429(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(backlog_budget=100, tenant_backlog_budget=2), redis).test_client()
    ids = [client.post("/v1/jobs", json=BODY).get_json()["id"] for _ in range(2)]
    refused = client.post("/v1/jobs", json=BODY)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "tenant_backlog_full"
    assert refused.headers["Retry-After"]
    assert redis.zcard(keys.tenant_backlog(keys.DEFAULT_TENANT)) == 2
    leave_backlog(redis, keys.DEFAULT_TENANT, ids[0])  # one started: room again
    assert client.post("/v1/jobs", json=BODY).status_code == 202


def test_rejected_job_leaves_its_tenant_backlog(redis: Redis, scheduler_for, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, client = scheduler_for(hold_timeout=0)
    job_id = client.post("/v1/jobs", json=BODY).get_json()["id"]
    assert redis.zscore(keys.tenant_backlog(keys.DEFAULT_TENANT), job_id) is not None
    clock.now = time.time() + 0.01
    scheduler.schedule(Intake(redis).take(0.1))  # type: ignore[arg-type]  # no worker, no patience
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "rejected"
    assert redis.zcard(keys.tenant_backlog(keys.DEFAULT_TENANT)) == 0


def test_a_request_identical_to_one_being_decoded_follows_it_to_its_worker(
    redis: Redis, scheduler_for
) -> None:  # type: ignore[no-untyped-def]
    from shared.affinity import decoding_worker, mark_decoding, unmark_decoding
    from shared.jobstore.rqstore import fetch_job

    scheduler, client = scheduler_for(response_cache=True)
    publish(redis, keys.worker_heartbeat("s"), _beat(keys.SINGLE_QUEUE, 0.1), 30)
    publish(redis, keys.worker_heartbeat("m"), _beat(keys.MULTI_QUEUE, 0.1), 30)
    first = client.post("/v1/jobs", json=BODY).get_json()["id"]
    fingerprint = fetch_job(first, redis).meta["cache_key"]["fingerprint"]
    scheduler.schedule(Intake(redis).take(0.1))  # type: ignore[arg-type]
    assert client.get(f"/v1/jobs/{first}").get_json()["route"]["reason"] == "within_threshold"

    mark_decoding(redis, fingerprint, "w-gpu-single", 60)  # as its worker does while decoding it
    second = client.post("/v1/jobs", json=BODY).get_json()["id"]
    scheduler.schedule(Intake(redis).take(0.1))  # type: ignore[arg-type]
    route = client.get(f"/v1/jobs/{second}").get_json()["route"]
    assert route["reason"] == "identical_decoding"
    assert open_queue(keys.own_queue("w-gpu-single"), redis).job_ids == [second]

    unmark_decoding(redis, fingerprint, "someone-else")  # another worker's mark stays
    assert decoding_worker(redis, fingerprint) == "w-gpu-single"
    unmark_decoding(redis, fingerprint, "w-gpu-single")
    assert decoding_worker(redis, fingerprint) is None
    other = client.post("/v1/jobs", json={**BODY, "prompt": "Something else"}).get_json()["id"]
    mark_decoding(redis, fingerprint, "w-gpu-single", 60)  # a mark for another request only
    scheduler.schedule(Intake(redis).take(0.1))  # type: ignore[arg-type]
    assert client.get(f"/v1/jobs/{other}").get_json()["route"]["reason"] == "within_threshold"
