"""compose/redis/start.sh, which every Redis and Sentinel runs in compose and on Kubernetes, run here
on Debian's redis-server and redis-sentinel with compose's own options and environment (addresses
aside): a primary and two replicas, three Sentinels with quorum 2 that fail the primary over, the
old primary rejoining as a replica, and the password on no command line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, ReadOnlyError, RedisError
from redis.sentinel import Sentinel

from cli.up import free_port
from shared.connection import connect
from shared.replication import acknowledge
from shared.settings import Settings
from tests.conftest import wait_for
from tests.deploy import COMPOSE, MAIN, REDIS_NODES, REDIS_PASSWORD, SENTINELS, config

SCRIPT = COMPOSE / "redis" / "start.sh"
HOST = "localhost"
"""A name, not an address: the Sentinels resolve and announce hostnames, as they do in compose."""

DOWN_AFTER_MS = "1000"
"""Sentinels here think the primary down after 1 s without an answer (compose: 5 s)."""

FAILOVER_TIMEOUT_MS = "5000"
"""A failed election is retried after twice this (compose: 60 s)."""


@dataclass
class Cluster:
    """compose's three Redis and three Sentinels, each run by start.sh on its own localhost port."""

    folder: Path
    services: dict[str, Any]
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*REDIS_NODES, *SENTINELS):
            self.ports[name] = free_port()

    def address(self, name: str) -> str:
        return f"{HOST}:{self.ports[name]}"

    def start(self, name: str) -> None:
        """Start `name` as compose does: its command and environment, this host's addresses."""
        service = self.services[name]
        folder = self.folder / name
        folder.mkdir(exist_ok=True)
        env = {
            **{k: str(v) for k, v in service["environment"].items()},
            "REDIS_SELF": self.address(name),
            "REDIS_NODES": " ".join(self.address(n) for n in REDIS_NODES),
            "SENTINEL_NODES": " ".join(self.address(s) for s in SENTINELS),
            "REDIS_DIR": str(folder),
            "REDIS_CONF_DIR": str(folder),
            "PATH": os.environ["PATH"],
        }
        if name in SENTINELS:
            env |= {
                "SENTINEL_DOWN_AFTER_MS": DOWN_AFTER_MS,
                "SENTINEL_FAILOVER_TIMEOUT_MS": FAILOVER_TIMEOUT_MS,
            }
        sh, script, *options = service["command"]
        assert Path(script).name == SCRIPT.name
        with (folder / "log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sh, str(SCRIPT), *options, "--bind", "127.0.0.1", "-::1"], env=env, stdout=log, stderr=log
            )
        wait_for(lambda: self.answers(name), 20, f"{name} to answer")

    def answers(self, name: str) -> bool:
        process = self.processes[name]
        assert process.poll() is None, (self.folder / name / "log").read_text()[-2000:]
        try:
            return bool(self.client(name).ping())
        except RedisError:
            return False

    def client(self, name: str) -> Redis:
        return Redis(
            host=HOST, port=self.ports[name], password=REDIS_PASSWORD, socket_timeout=2, decode_responses=True
        )

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def primary(self) -> str | None:
        """The node the Sentinels name as the primary now (None while they name none)."""
        sentinels = [(HOST, self.ports[s]) for s in SENTINELS]
        manager = Sentinel(
            sentinels, socket_timeout=1, sentinel_kwargs={"password": REDIS_PASSWORD, "socket_timeout": 1}
        )
        try:
            host, port = manager.discover_master("gptoss")
        except RedisError:
            return None
        return next(n for n in REDIS_NODES if (HOST, self.ports[n]) == (host, int(port)))

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    assert shutil.which("redis-sentinel"), "redis-sentinel is not installed (scripts/setup installs it)"
    started = Cluster(tmp_path, config(MAIN)["services"])
    try:
        for name in (*REDIS_NODES, *SENTINELS):
            started.start(name)
        yield started
    finally:
        started.stop()


def replicas_online(client: Redis) -> int:
    info = client.info("replication")
    return sum(
        1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v["state"] == "online"
    )


def process_client(cluster: Cluster) -> Redis:
    """A client as compose's API makes one: its environment, this host's Sentinels."""
    env = {
        k: str(v) for k, v in cluster.services["api"]["environment"].items() if k.startswith("GPTOSS_REDIS_")
    }
    env["GPTOSS_REDIS_SENTINELS"] = ",".join(cluster.address(s) for s in SENTINELS)
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings()
    return connect(settings.redis_url_or_default(), acks=settings.redis_acks())


def writes(client: Redis, value: str) -> bool:
    """`client` wrote `value` and a replica acknowledged it (the job store's WAIT)."""
    try:
        client.set("deploy-redis", value)
        acknowledge(client, "test write")
        return True
    except RedisError:
        return False


def test_start_sh_runs_a_primary_two_replicas_and_three_sentinels(cluster: Cluster) -> None:
    primary = cluster.client("redis-0")
    assert primary.role()[0] == "master", "redis-0 is the primary on a cold start"
    for name in ("redis-1", "redis-2"):
        role = cluster.client(name).role()
        assert (role[0], role[1], role[2]) == ("slave", HOST, cluster.ports["redis-0"])
    wait_for(lambda: replicas_online(primary) == 2, 20, "both replicas to sync")
    assert primary.config_get("min-replicas-to-write") == {"min-replicas-to-write": "1"}
    assert primary.config_get("appendonly") == {"appendonly": "yes"}

    def sentinels_agree() -> bool:
        views = [cluster.client(s).sentinel_master("gptoss") for s in SENTINELS]
        return all(v["num-slaves"] == 2 and v["num-other-sentinels"] == 2 for v in views)

    wait_for(sentinels_agree, 30, "the Sentinels to find each other and the replicas")
    for name in SENTINELS:
        master = cluster.client(name).sentinel_master("gptoss")
        assert (master["ip"], master["port"], master["quorum"]) == (HOST, cluster.ports["redis-0"], 2)
        # (redis-py's sentinel_ckquorum wants a bare OK; the answer goes on to say how many are usable.)
        ckquorum = cluster.client(name).execute_command("SENTINEL", "CKQUORUM", "gptoss")
        assert ckquorum.startswith("OK 3 usable Sentinels"), ckquorum
    # The processes' client finds the primary through the Sentinels; its writes wait for a replica.
    assert writes(process_client(cluster), "before")

    # The password is in each node's config file, on no command line; without it, nothing answers.
    for name, process in cluster.processes.items():
        assert REDIS_PASSWORD not in Path(f"/proc/{process.pid}/cmdline").read_text(), name
        with pytest.raises(AuthenticationError):
            Redis(host=HOST, port=cluster.ports[name], socket_timeout=2).ping()


def test_the_sentinels_fail_over_and_the_old_primary_rejoins_as_a_replica(cluster: Cluster) -> None:
    client = process_client(cluster)
    wait_for(lambda: writes(client, "before"), 30, "a replicated write")
    cluster.kill("redis-0")
    wait_for(lambda: cluster.primary() not in ("redis-0", None), 60, "the Sentinels to promote a replica")
    promoted = cluster.primary()
    assert promoted is not None
    wait_for(lambda: writes(client, "after"), 60, "a replicated write on the promoted primary")

    # Restarted with the same command and environment, redis-0 asks the Sentinels first: it comes
    # back as the new primary's replica (a static config would make it a second primary).
    cluster.start("redis-0")
    role = cluster.client("redis-0").role()
    assert (role[0], role[1], role[2]) == ("slave", HOST, cluster.ports[promoted])
    with pytest.raises(ReadOnlyError):
        cluster.client("redis-0").set("deploy-redis", "split brain")
    wait_for(lambda: cluster.client("redis-0").get("deploy-redis") == "after", 30, "redis-0 to resync")
    assert cluster.primary() == promoted
