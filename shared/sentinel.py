"""A Redis that Sentinel watches: its URL, and the connection pools that follow its primary.

The URL is the one rq-dashboard (redis-sentinel-url) already reads, so every process, the CLI and
the dashboard take the same string:

    redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db][?sentinel_password=…]

`password` (and `user`) are the primary's; `sentinel_password` the Sentinels' own (they are asked
where the primary is, and told nothing else). A client built from it asks the Sentinels for the
primary when it connects; after a failover its connections fail once (the old primary is gone, or
answers READONLY as a replica), are dropped, and the next command reconnects to the new primary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from redis import BlockingConnectionPool
from redis.sentinel import Sentinel, SentinelConnectionPool

SCHEME = "redis+sentinel"
"""The URL scheme of a Redis watched by Sentinel (as rq-dashboard spells it)."""

DEFAULT_SENTINEL_PORT = 26379
"""Port of a Sentinel named without one."""

SENTINEL_TIMEOUT = 1.0
"""Seconds one Sentinel may take to answer where the primary is (then the next is asked)."""


@dataclass(frozen=True)
class SentinelAddress:
    """Where the Sentinels are and which primary they watch."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel_url(url: str) -> bool:
    """`url` names a Redis watched by Sentinel."""
    return url.startswith(SCHEME + "://")


def parse(url: str) -> SentinelAddress:
    """The address in a `redis+sentinel://` URL (ValueError for anything else)."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError(f"not a {SCHEME}:// URL")
    auth, _, hosts = parts.netloc.rpartition("@")
    username, _, password = auth.partition(":") if auth else ("", "", "")
    sentinels = tuple(_host(spec) for spec in hosts.split(",") if spec)
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path:
        raise ValueError(
            f"a {SCHEME}:// URL names its Sentinels and its service: {SCHEME}://host:port/service"
        )
    query = parse_qs(parts.query)
    return SentinelAddress(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) > 1 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=query["sentinel_password"][0] if "sentinel_password" in query else None,
    )


def _host(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":") if ":" in spec else (spec, "", "")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


def compose(sentinels: str, service: str, password: str | None, sentinel_password: str | None) -> str:
    """The URL of `service` watched by `sentinels` ("host:port,host:port"), with the primary's and
    the Sentinels' passwords."""
    auth = f":{quote(password, safe='')}@" if password else ""
    query = f"?{urlencode({'sentinel_password': sentinel_password})}" if sentinel_password else ""
    return f"{SCHEME}://{auth}{sentinels}/{service}{query}"


def without_sentinel_password(url: str) -> str:
    """`url` without its Sentinels' password (rq-dashboard takes that one from its own setting)."""
    parts = urlsplit(url)
    return parts._replace(query="").geturl()


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel pool of at most `max_connections`, whose callers wait for a free one (as the
    API's shared clients do on a plain Redis)."""


def sentinel_pool(address: SentinelAddress, *, shared: int | None, pool_wait: float, **options: Any) -> Any:
    """A connection pool to the primary `address` names (`options`: the connections' own, as
    ConnectionPool.from_url takes them; `shared`: a bounded, blocking pool)."""
    manager = Sentinel(
        list(address.sentinels),
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "password": address.sentinel_password,
        },
    )
    options |= {"db": address.db, "username": address.username, "password": address.password}
    if shared is not None:
        return BlockingSentinelPool(
            address.service, manager, max_connections=shared, timeout=pool_wait, **options
        )
    return SentinelConnectionPool(address.service, manager, **options)
