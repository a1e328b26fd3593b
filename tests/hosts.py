"""Hosts on one machine: Linux network namespaces joined by veth pairs to one bridge, each with its
own address on a private /24 that leads nowhere else. The test's own process is one more host
(the user's), so it reaches each service at that service's address, as a client on the LAN would.
Needs root (CAP_NET_ADMIN) and iproute2."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.77.{}.{}"
"""Addresses of the hosts: 10.77.<net>.<n>/24 (net chosen per run so two runs do not meet)."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Network:
    """A bridge in a namespace of its own, hosts attached to it, the test's process attached too."""

    tag: str = field(default_factory=lambda: f"g{os.getpid() % 100000}")
    net: int = field(default_factory=lambda: 100 + os.getpid() % 150)
    hosts: dict[str, str] = field(default_factory=dict)
    """Namespace of each host -> its address."""
    _links: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.tag}sw"

    def open(self) -> Network:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        self._attach(None, 254)  # the test's own host
        return self

    def add(self, name: str) -> str:
        """A new host `name` (its namespace); its address."""
        namespace = f"{self.tag}{name}"
        _ip("netns", "add", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        address = self._attach(namespace, len(self.hosts) + 1)
        self.hosts[namespace] = address
        return address

    def prefix(self, address: str) -> list[str]:
        """The command prefix that runs a program on the host at `address`."""
        namespace = next(ns for ns, a in self.hosts.items() if a == address)
        return ["ip", "netns", "exec", namespace]

    def _attach(self, namespace: str | None, n: int) -> str:
        inside, outside = f"{self.tag}v{n}", f"{self.tag}p{n}"
        _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        _ip("link", "set", outside, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", outside, "master", "br0", "up")
        address = SUBNET.format(self.net, n)
        where = ["-n", namespace] if namespace else []
        if namespace:
            _ip("link", "set", inside, "netns", namespace)
        else:
            self._links.append(inside)
        _ip(*where, "addr", "add", f"{address}/24", "dev", inside)
        _ip(*where, "link", "set", inside, "up")
        return address

    def close(self) -> None:
        """Delete every namespace (their links go with them) and the test host's link."""
        for link in self._links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for namespace in [*self.hosts, self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def namespaces_work() -> str | None:
    """None when this process may make network namespaces; else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    probe = f"gprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None
