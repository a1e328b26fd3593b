"""A Redis watched by Sentinel: the URL every process takes, clients that follow a failover, and the
acknowledged writes that survive it (shared/sentinel.py, shared/replication.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from bench.sentinel_cluster import SentinelCluster
from shared import keys, sentinel
from shared.connection import connect, masked_url
from shared.jobstore import lifecycle
from shared.jobstore.record import JobRecord
from shared.replication import Acks, NotReplicated, acknowledge
from shared.settings import Settings


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    started = SentinelCluster(tmp_path_factory.mktemp("sentinel")).start()
    yield started
    started.stop()


def test_the_settings_name_the_sentinels_in_the_url_rq_dashboard_reads() -> None:
    settings = Settings(redis_sentinels="10.0.0.1:26379,10.0.0.2", redis_password="p@ss:w/rd",
                        redis_sentinel_password="watch")  # fmt: skip
    url = settings.redis_url_or_default()
    assert url.startswith("redis+sentinel://") and settings.redis_given()
    address = sentinel.parse(url)
    assert address.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (address.service, address.db, address.password) == ("gptoss", 0, "p@ss:w/rd")
    assert address.sentinel_password == "watch"
    assert "p@ss" not in masked_url(url) and "***" in masked_url(url)
    assert "watch" not in sentinel.without_sentinel_password(url)
    with pytest.raises(ValueError, match="service"):
        sentinel.parse("redis+sentinel://10.0.0.1:26379")


def test_a_write_that_must_survive_waits_for_replicas(cluster: SentinelCluster) -> None:
    client = connect(cluster.url, acks=Acks(replicas=2, timeout_ms=2000))
    record = JobRecord(model="smollm2-135m", tenant="acme", retention=60)
    job = lifecycle.enqueue(client, {"prompt": "x"}, record, timeout=60, description="generate")
    for node in cluster.redis:  # acknowledged by both replicas: every node holds the job
        assert Redis(host=node.host, port=node.port).exists(f"rq:job:{job.id}")
    strict = connect(cluster.url, acks=Acks(replicas=3, timeout_ms=100))  # only two replicas exist
    strict.set("gptoss:test", 1)
    with pytest.raises(NotReplicated):
        acknowledge(strict, "test write")
    acknowledge(strict, "test write", strict=False)  # logged only
    acknowledge(connect(cluster.url), "test write")  # a client without Acks never waits


def test_clients_follow_the_primary_through_a_failover(tmp_path: Path) -> None:
    own = SentinelCluster(tmp_path).start()
    try:
        plain = connect(own.url, acks=Acks(replicas=1))
        budgeted = connect(own.url, budgeted=True, shared=4)
        blocking = connect(own.url, blocking=True)
        plain.set("kept", "yes")
        acknowledge(plain, "kept")
        assert budgeted.get("kept") == b"yes" and blocking.get("kept") == b"yes"
        old = own.kill_primary()
        own.wait_failover(old)
        assert own.primary() != (old.host, old.port)
        # Each client's next commands fail over to the promoted replica (redis-py's retries).
        for client in (plain, budgeted, blocking):
            assert _eventually(lambda c=client: c.get("kept")) == b"yes"  # type: ignore[misc]
        assert _eventually(lambda: plain.set("after", 1)) is True
    finally:
        own.stop()


def _eventually(call, attempts: int = 50):  # type: ignore[no-untyped-def]
    """`call()`'s value once it stops raising (a client's first command after a failover may fail)."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return call()
        except Exception as exc:  # the old primary's connection breaks once
            last = exc
    raise AssertionError(f"still failing: {last}")


def test_the_api_and_rq_dashboard_reach_redis_through_the_sentinels(cluster: SentinelCluster) -> None:
    from api.app import create_app

    client = connect(cluster.url)
    record = JobRecord(model="smollm2-135m", tenant="default", retention=60)
    lifecycle.enqueue(client, {"prompt": "x"}, record, timeout=60, description="generate")
    app = create_app(Settings(redis_sentinels=cluster.sentinel_list, auth=False, admin_key="adm"))
    answer = app.test_client().get("/admin/rq/0/data/queues.json", headers={"Authorization": "Bearer adm"})
    assert answer.status_code == 200, answer.data
    counts = {q["name"]: q["count"] for q in answer.get_json()["queues"]}
    assert counts.get(keys.priority_queue(keys.INCOMING_QUEUE, "normal"), 0) >= 1
