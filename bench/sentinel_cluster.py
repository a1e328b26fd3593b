"""A Redis watched by Sentinel, on this machine: one primary, two replicas and three Sentinels (Debian's
redis-server and redis-sentinel), for bench/failover.py and the tests.

Each node may run under a prefix (`ip netns exec <ns>`) and bind its own address, so the multi-host
test puts them in network namespaces. Nothing is kept on disk but the Sentinels' own config files,
which they rewrite as they learn the topology.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from redis.sentinel import Sentinel

SERVICE = "gptoss"
"""The name the Sentinels know the primary by (GPTOSS_REDIS_SENTINEL_MASTER's default)."""

DOWN_AFTER_MS = 1000
"""Milliseconds without an answer before a Sentinel thinks the primary down (production: 5000 or more)."""

FAILOVER_TIMEOUT_MS = 5000
"""Sentinel's failover-timeout: how long one failover attempt may take before another is tried."""

START_TIMEOUT = 20.0
"""Seconds a node may take to answer after it starts."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    """One redis-server or redis-sentinel: where it listens and how it is launched."""

    host: str
    port: int
    prefix: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None


@dataclass
class SentinelCluster:
    """Three Redis and three Sentinels in `folder`; `hosts`: the address of each of the six (a
    namespace test gives each its own), `prefixes`: what each is launched under."""

    folder: Path
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"] * 6)
    prefixes: list[list[str]] = field(default_factory=lambda: [[] for _ in range(6)])
    min_replicas_to_write: int = 0
    redis: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    def start(self) -> SentinelCluster:
        """Start the primary, its two replicas, then the Sentinels; return once all answer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            self.redis.append(Node(self.hosts[i], _port(self.hosts[i], 6379 + i), self.prefixes[i]))
        primary = self.redis[0]
        for i, node in enumerate(self.redis):
            self._start_redis(node, i, None if i == 0 else primary)
        for i in range(3):
            host = self.hosts[3 + i]
            node = Node(host, _port(host, 26379 + i), self.prefixes[3 + i])
            self.sentinels.append(node)
            self._start_sentinel(node, i, primary)
        for node in self.redis + self.sentinels:
            _wait_answer(node)
        self.wait_replicas(2)
        self.wait_sentinels()
        return self

    def _start_redis(self, node: Node, index: int, primary: Node | None) -> None:
        lines = [
            f"bind {node.host}",
            f"port {node.port}",
            "save ''",
            "appendonly no",
            "repl-diskless-sync-delay 0",  # a replica syncs at once (the default waits 5 s for others)
            f"dir {self.folder}",
            f"min-replicas-to-write {self.min_replicas_to_write}",
            "min-replicas-max-lag 10",
            "protected-mode no",
        ]
        if primary is not None:
            lines.append(f"replicaof {primary.host} {primary.port}")
        config = self.folder / f"redis-{index}.conf"
        config.write_text("\n".join(lines) + "\n")
        argv = [_binary("redis-server"), str(config)]
        node.process = _launch(node.prefix, argv, self.folder / f"redis-{index}.log")

    def _start_sentinel(self, node: Node, index: int, primary: Node) -> None:
        config = self.folder / f"sentinel-{index}.conf"
        config.write_text(
            "\n".join(
                [
                    f"bind {node.host}",
                    f"port {node.port}",
                    "protected-mode no",
                    f"dir {self.folder}",
                    f"sentinel monitor {SERVICE} {primary.host} {primary.port} 2",
                    f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {SERVICE} 1",
                ]
            )
            + "\n"
        )
        argv = [_binary("redis-sentinel"), str(config)]
        node.process = _launch(node.prefix, argv, self.folder / f"sentinel-{index}.log")

    @property
    def sentinel_list(self) -> str:
        """The Sentinels as GPTOSS_REDIS_SENTINELS names them."""
        return ",".join(f"{n.host}:{n.port}" for n in self.sentinels)

    @property
    def url(self) -> str:
        """The cluster's redis+sentinel:// URL."""
        return f"redis+sentinel://{self.sentinel_list}/{SERVICE}"

    def primary(self) -> tuple[str, int]:
        """Where the Sentinels say the primary is now."""
        manager = Sentinel([(n.host, n.port) for n in self.sentinels], socket_timeout=1.0)
        host, port = manager.discover_master(SERVICE)
        return str(host), int(port)

    def primary_node(self) -> Node:
        """The node that is the primary now."""
        host, port = self.primary()
        return next(n for n in self.redis if (n.host, n.port) == (host, port))

    def kill_primary(self) -> Node:
        """SIGKILL the primary (the failover's start); the node killed."""
        node = self.primary_node()
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        return node

    def wait_failover(self, old: Node, timeout: float = 30.0) -> float:
        """Seconds until the Sentinels name a primary other than `old` (TimeoutError after `timeout`)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if self.primary() != (old.host, old.port):
                    return time.monotonic() - started
            except Exception:  # a Sentinel between states: ask again
                pass
            time.sleep(0.05)
        raise TimeoutError("no failover within the timeout")

    def wait_replicas(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Return once the first primary has `count` replicas online (synced)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.redis[0]
            info = Redis(host=node.host, port=node.port, socket_timeout=1).info("replication")
            online = [k for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"]  # fmt: skip
            if len(online) >= count:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the primary has fewer than {count} replicas")

    def wait_sentinels(self, timeout: float = START_TIMEOUT) -> None:
        """Return once every Sentinel knows the two others and both replicas: until then a killed
        primary may find no quorum (a Sentinel learns of the others from their hello messages, every
        2 s) and never fail over."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(self._knows_all(node) for node in self.sentinels):
                    return
            except Exception:  # a Sentinel still starting: ask again
                pass
            time.sleep(0.1)
        raise TimeoutError("the Sentinels did not learn of each other and the replicas")

    @staticmethod
    def _knows_all(node: Node) -> bool:
        client = Redis(host=node.host, port=node.port, socket_timeout=1, decode_responses=True)
        others = client.execute_command("SENTINEL", "SENTINELS", SERVICE)
        replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
        return len(others) >= 2 and len(replicas) >= 2

    def stop(self) -> None:
        """Stop every node still running."""
        for node in self.sentinels + self.redis:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(5)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()


def _port(host: str, fixed: int) -> int:
    """A free port on loopback (shared with everything else here); `fixed` on a namespace's own address."""
    return free_port() if host == "127.0.0.1" else fixed


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        raise RuntimeError(f"{name} is not installed (Debian: apt-get install redis-sentinel)")
    return path


def _launch(prefix: list[str], argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([*prefix, *argv], stdout=out, stderr=subprocess.STDOUT)


def _wait_answer(node: Node) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            Redis(host=node.host, port=node.port, socket_timeout=1, socket_connect_timeout=1).ping()
            return
        except Exception:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"{node.host}:{node.port} exited with {node.process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.host}:{node.port} did not answer") from None
            time.sleep(0.05)
