"""Bounded Redis memory: after a run that makes every kind of key, every key the project (or RQ
for it) wrote has a TTL, except a short list of queue structures and configuration, each bounded by
something the test checks; and the jobstore's cleanup keeps RQ's registries and worker sets to what
still exists."""

from __future__ import annotations

import fnmatch

import requests
from redis import Redis
from rq import SimpleWorker
from rq.job import Job, JobStatus

from cli.up import free_port
from scheduler.reaper import Reaper
from shared import keys
from shared.apikeys import create_key
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore import cleanup, lifecycle, rqstore
from shared.jobstore.record import JobRecord
from tests.conftest import FakeClock, Processes, http_ok, process_env, wait_for

JOB_REGISTRIES = tuple(registry.key_template.format("*") for registry in rqstore.REGISTRIES.values())
"""RQ's registries: after a cleanup each entry names a job that exists, and every job that ended has
a TTL (its retention), so a registry holds at most the jobs running or kept."""

WORKER_SETS = ("rq:workers", "rq:workers:*")
"""RQ's worker sets: after a cleanup each member is the key of a worker that exists (a key RQ gives
a TTL, renewed while the worker lives)."""

WITHOUT_TTL = {
    keys.WEBHOOK_OUTBOX: "webhook messages not yet delivered: each leaves once delivered or given up",
    # RQ's own structures.
    "rq:queue:*": "a queue, or its intermediate list: ids leave as workers take and start them; the "
    "backlog budget bounds them (cleanup drops ids of jobs gone from intermediate lists)",
    "rq:queues": "the set of queue names: the fixed ones and live workers' own (the reaper removes a "
    "dead worker's)",
    "rq:workers": "live workers' keys: cleanup prunes a dead worker's once its key expired",
    "rq:workers:*": "per-queue sets of live workers' keys: cleanup prunes dead ones, and an emptied set "
    "(a dead worker's own queue) is gone",
    "rq:wip:*": "started registries: entries of running jobs; cleanup drops those of jobs that ended or "
    "are gone",
    "rq:finished:*": "finished registries: scored by expiry (RQ's cleanup) and trimmed of jobs gone",
    "rq:failed:*": "failed registries: scored by expiry (RQ's cleanup) and trimmed of jobs gone",
    "rq:canceled:*": "canceled registries (rejected and cancelled jobs, scored by when): bounded only "
    "because cleanup drops the entry once the job's retention ran out",
    # Ours: queue structures and configuration, each bounded by something else.
    keys.SCHEDULER_INFLIGHT: "at most one id per scheduler",
    keys.SCHEDULER_HELD: "held jobs, bounded by the backlog budget",
    keys.RUNNING: "one entry per running job",
    keys.API_KEYS: "configuration: one entry per key an operator made",
    keys.API_KEY_IDS: "configuration: one entry per key an operator made",
}


def test_every_key_has_a_ttl_or_a_reason(
    redis: Redis, redis_url: str, prepared_models, processes: Processes
) -> None:
    api_port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_MODEL="tiny-gpt-oss",
        GPTOSS_API_PORT=api_port, GPTOSS_AUTH="true", GPTOSS_HOLD_TIMEOUT=1, GPTOSS_ADMIN_KEY="adm",
        GPTOSS_HEARTBEAT_INTERVAL=0.25, GPTOSS_HEARTBEAT_TTL=2,
    )  # fmt: skip
    base = f"http://127.0.0.1:{api_port}"
    key, _ = create_key(redis, "acme")
    auth = {"Authorization": f"Bearer {key}"}
    processes.start("api", ["api"], env)
    wait_for(lambda: http_ok(f"{base}/healthz"), 30, "the API")

    # Cancelled while it waits on `incoming` (no scheduler yet): an entry of a canceled registry.
    cancelled = requests.post(
        f"{base}/v1/jobs", json={"prompt": "a", "max_tokens": 2}, headers=auth, timeout=10
    )
    cancelled_id = cancelled.json()["id"]
    assert requests.delete(f"{base}/v1/jobs/{cancelled_id}", headers=auth, timeout=10).status_code == 200
    processes.start("scheduler", ["scheduler"], env)
    # Held then rejected (hold_expired): no worker lives yet.
    expired = requests.post(
        f"{base}/v1/jobs", json={"prompt": "a", "max_tokens": 2}, headers=auth, timeout=10
    )
    expired_url = f"{base}/v1/jobs/{expired.json()['id']}"
    wait_for(lambda: requests.get(expired_url, headers=auth, timeout=5).json()["status"] == "rejected", 30,
             "the held job to expire")  # fmt: skip
    for queue in ("gpu-single", "gpu-multi"):
        processes.start(queue, ["workers"], {**env, "GPTOSS_WORKER_QUEUE": queue})
    wait_for(lambda: http_ok(f"{base}/readyz"), 60, "readiness")
    finished = requests.post(
        f"{base}/v1/jobs", json={"prompt": "Hi", "max_tokens": 3}, headers=auth, timeout=10
    )
    failing = rqstore.open_queue(keys.SINGLE_QUEUE, redis).enqueue(
        keys.GENERATE_FUNC, {"prompt": "x", "temperature": 9}, failure_ttl=keys.FAILURE_TTL
    )
    stream = requests.get(f"{base}/v1/jobs/{finished.json()['id']}/events", headers=auth, timeout=60)
    assert "event: done" in stream.text
    wait_for(lambda: failing.get_status(refresh=True) == "failed", 30, "the bad job to fail")
    requests.get(f"{base}/admin/debug-bundle", headers={"Authorization": "Bearer adm"}, timeout=30)
    wait_for(lambda: idle_workers(redis) == 2 and not redis.exists(keys.RUNNING), 30, "both workers idle")

    # The cancelled job's retention runs out; the cleanup the reaper runs drops its registry entry.
    redis.delete(rqstore.job_key(cancelled_id))
    cleanup.clean(redis)

    names = [raw.decode() for raw in redis.scan_iter(count=1000)]
    for kind in ("gptoss:stream:*", keys.DECISIONS, keys.DRAINED, "gptoss:ratelimit*", "gptoss:heartbeat:*",
                 "rq:job:*", "rq:results:*", "rq:worker:*", "rq:canceled:*", "rq:failed:*", "rq:finished:*",
                 "rq:workers:worker:*"):  # fmt: skip
        assert any(fnmatch.fnmatchcase(n, kind) for n in names), f"the run made no {kind} key"
    unbounded, dangling = [], []
    for name in names:
        if redis.ttl(name) >= 0 or redis.type(name) == b"none":
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in WITHOUT_TTL):
            unbounded.append((name, redis.type(name).decode()))
        dangling += dangling_entries(redis, name)
    assert not unbounded, f"keys without a TTL and without a reason: {unbounded}"
    assert not dangling, f"entries naming a job or worker that no longer exists: {dangling}"


def idle_workers(redis: Redis) -> int:
    return sum(1 for b in read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat) if b.state == "idle")


def dangling_entries(redis: Redis, name: str) -> list[str]:
    """Entries of registry or worker set `name` whose job or worker no longer exists."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in JOB_REGISTRIES):
        ids = [m.decode().split(":", 1)[0] for m in redis.zrange(name, 0, -1)]
        return [f"{name} {i}" for i in ids if not redis.exists(rqstore.job_key(i))]
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in WORKER_SETS):
        return [f"{name} {m.decode()}" for m in redis.smembers(name) if not redis.exists(m)]
    return []


# --- the cleanup, against the tests' Redis ------------------------------------------------------


def submitted(redis: Redis) -> Job:
    """A job on `incoming`, as the API enqueues it."""
    record = JobRecord(model="m", tenant="t")
    record.stamp("received")
    return lifecycle.enqueue(redis, {"prompt": "x"}, record, timeout=60, description="generate m")


def rejected(redis: Redis) -> str:
    """A job the scheduler rejected: in the canceled registry of `incoming`."""
    job = submitted(redis)
    lifecycle.end_unstarted(redis, job, lifecycle.read(job), "rejected", "hold_expired", "No worker.")
    return str(job.id)


def canceled_ids(redis: Redis, queue: str = keys.INCOMING_QUEUE) -> list[str]:
    return rqstore.open_queue(queue, redis).canceled_job_registry.get_job_ids()


def worker(redis: Redis, name: str) -> SimpleWorker:
    """An RQ worker of gpu-single with its own queue, as workers/ builds one, registered in RQ."""
    names = [keys.own_queue(name), *keys.queues_by_priority(keys.SINGLE_QUEUE)]
    queues = [rqstore.open_queue(q, redis) for q in names]
    rq_worker = SimpleWorker(queues, connection=redis, name=name, serializer=rqstore.SERIALIZER)
    rq_worker.register_birth()
    return rq_worker


def test_cleanup_drops_canceled_entries_once_their_job_expired(redis: Redis) -> None:
    gone, kept = rejected(redis), rejected(redis)
    assert sorted(canceled_ids(redis)) == sorted([gone, kept])
    redis.delete(rqstore.job_key(gone))  # its retention ran out
    assert cleanup.clean(redis).entries == 1
    assert canceled_ids(redis) == [kept]
    assert cleanup.clean(redis).entries == 0


def test_cleanup_leaves_running_jobs_and_drops_ended_or_gone_executions(redis: Redis) -> None:
    rq_worker = worker(redis, "w1")
    started = {}
    for label in ("running", "gone", "ended"):
        job = submitted(redis)
        started[label] = job
        rqstore.start_job(rq_worker, job, lambda pipe: None)  # RQ's started state and execution
    redis.delete(rqstore.job_key(started["gone"].id))
    started["ended"].set_status(JobStatus.FINISHED)  # ended, its execution left behind
    registry = rqstore.open_queue(keys.INCOMING_QUEUE, redis).started_job_registry
    assert len(registry.get_job_ids(cleanup=False)) == 3
    assert cleanup.clean(redis).entries == 2
    assert registry.get_job_ids(cleanup=False) == [started["running"].id]


def test_cleanup_prunes_a_dead_workers_sets_and_own_queue_registries(redis: Redis) -> None:
    live, dead = worker(redis, "live"), worker(redis, "dead")
    own = rqstore.open_queue(keys.own_queue("dead"), redis)
    result = {"text": "t", "finish_reason": "stop", "model": "m", "worker": "dead", "queue": own.name,
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    served = rqstore.create_finished(redis, keys.GENERATE_FUNC, {"prompt": "x"}, result, queue=own.name,
                                     meta={}, ttl=60, description="generate m")  # fmt: skip
    # SIGKILLed: it never unregistered; the reaper released its own queue; then its key expired.
    lifecycle.release_own_queue(redis, "dead")
    redis.delete(dead.key, rqstore.job_key(served.id))
    assert own.name not in rqstore.waiting_queues(redis)

    trimmed = cleanup.clean(redis)
    assert (trimmed.workers, trimmed.entries) == (1, 1)
    assert SimpleWorker.all_keys(connection=redis) == [live.key]
    single = rqstore.open_queue(keys.SINGLE_QUEUE, redis)
    assert SimpleWorker.all_keys(queue=single) == [live.key]
    assert not redis.exists(f"rq:workers:{own.name}", own.finished_job_registry.key)
    assert SimpleWorker.all_keys(queue=rqstore.open_queue(keys.own_queue("live"), redis)) == [live.key]


def test_cleanup_drops_intermediate_ids_of_jobs_gone(redis: Redis) -> None:
    queue = rqstore.open_queue(keys.priority_queue(keys.SINGLE_QUEUE, "normal"), redis)
    kept, gone = submitted(redis), submitted(redis)
    for job in (kept, gone):
        redis.rpush(rqstore.intermediate_key(queue), job.id)
    redis.delete(rqstore.job_key(gone.id))
    assert cleanup.clean(redis).entries == 1
    assert redis.lrange(rqstore.intermediate_key(queue), 0, -1) == [kept.id.encode()]


def test_the_reaper_cleans_up_every_interval_of_its_clock(redis: Redis, clock: FakeClock) -> None:
    reaper = Reaper(redis, max_retries=2, settle=0, clock=clock,
                    cleanup=cleanup.Cleanup(redis, interval=60, clock=clock))  # fmt: skip
    first = rejected(redis)
    redis.delete(rqstore.job_key(first))
    reaper.sweep_if_due()  # the first sweep cleans
    assert canceled_ids(redis) == []
    second = rejected(redis)
    redis.delete(rqstore.job_key(second))
    clock.advance(30)
    reaper.sweep_if_due()
    assert canceled_ids(redis) == [second], "cleaned before its interval"
    clock.advance(30)
    reaper.sweep_if_due()
    assert canceled_ids(redis) == []
