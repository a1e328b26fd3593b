"""Redis connections, built from the settings' URL and passed down to whoever needs one; and the
budget that bounds how long one API request may wait on Redis.

A budget is opened per request (a contextvar, so it follows the request's thread and nothing else).
A budgeted client charges each command's whole wait to it (attempts, back-off and reconnects
together), caps every socket wait at what is left, and refuses to start an attempt once it is
spent (`BudgetSpent`, a RedisError: the API answers 503 + Retry-After). With no budget open a
budgeted client behaves exactly as a plain one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import BlockingConnectionPool, ConnectionPool, Redis
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import RedisError
from redis.retry import Retry
from redis.sentinel import SentinelManagedConnection

from shared import sentinel
from shared.replication import Acks

T = TypeVar("T")

SOCKET_TIMEOUT = 5.0
"""Seconds a non-blocking client waits on one socket operation when no budget is open."""

POOL_WAIT = 2.0
"""Seconds a caller of a `shared` client waits for a free connection (then a ConnectionError)."""

SHORTEST_WAIT = 0.001
"""Seconds a socket wait is given when the budget is spent mid-command: the command fails on its
own socket timeout (so redis-py drops the connection cleanly) instead of being cut in the middle."""

BLOCKING_COMMANDS = frozenset(
    {"BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP", "WAIT", "WAITAOF"}
)
"""Commands that wait on the server by design (XREAD and XREADGROUP too, with BLOCK)."""


def connect(
    url: str,
    *,
    blocking: bool = False,
    budgeted: bool = False,
    shared: int | None = None,
    acks: Acks | None = None,
) -> Redis:
    """A Redis client for `url` (redis://, rediss://, unix:// or redis+sentinel://, see
    shared/sentinel.py); `blocking` clients wait on BLMOVE/BLPOP, so reads never time out;
    `budgeted` clients keep each request within its Redis budget (see `open_budget`); with `shared`,
    at most that many connections, which callers wait for (up to POOL_WAIT seconds) when all are
    busy: thousands of greenlets share a few connections instead of opening one each; `acks`: the
    replicas that must hold a write the job store must not lose (shared/replication.py).

    redis-py 8 defaults socket_timeout to 5 s, which would cut RQ's and the scheduler's long
    blocking reads; short calls keep a timeout so a dead server is noticed.
    """
    if blocking and budgeted:
        raise ValueError("a blocking client waits without a bound; it cannot be budgeted")
    backoff = ExponentialBackoff(cap=2.0, base=0.1)
    scheme = urlsplit(url).scheme
    options: dict[str, Any] = {
        "socket_timeout": None if blocking else SOCKET_TIMEOUT,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": BudgetedRetry(backoff, retries=3) if budgeted else Retry(backoff, retries=3),
    }
    if budgeted:
        options["connection_class"] = BUDGETED_CONNECTIONS.get(scheme, BudgetedConnection)
    pool: Any
    if scheme == sentinel.SCHEME:
        pool = sentinel.sentinel_pool(sentinel.parse(url), shared=shared, pool_wait=POOL_WAIT, **options)
    elif shared is not None:
        pool = BlockingConnectionPool.from_url(url, max_connections=shared, timeout=POOL_WAIT, **options)
    else:
        pool = ConnectionPool.from_url(url, **options)
    client = Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as Redis.from_url's client: closing it closes its pool
    if acks is not None:
        acks.attach(client)
    return client


def masked_url(url: str) -> str:
    """`url` with its password, if any, shown as *** (for logs, banners and the debug bundle)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class BudgetSpent(RedisError):
    """The request has waited on Redis for all of its budget (not retried: nothing is left to wait)."""


class RedisBudget:
    """Seconds one request may wait on Redis, all its commands together."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._spent = 0.0
        self._since: float | None = None
        """When the outermost command in flight started (commands nest: a reconnect, a ping)."""
        self._depth = 0

    def left(self) -> float:
        """Seconds still to spend (negative once overspent)."""
        running = self._clock() - self._since if self._since is not None else 0.0
        return self.seconds - self._spent - running

    def check(self) -> None:
        """Raise BudgetSpent when nothing is left."""
        if self.left() <= 0:
            raise BudgetSpent(f"Redis did not answer within this request's budget of {self.seconds:g} s.")

    def cap(self, wait: float | None) -> float:
        """`wait` (None: unbounded) cut to what is left, never below SHORTEST_WAIT."""
        left = self.left()
        return max(SHORTEST_WAIT, left if wait is None else min(wait, left))

    @contextmanager
    def spending(self) -> Iterator[None]:
        """Charge the time spent inside (nested commands are charged once, by the outermost)."""
        if self._depth == 0:
            self._since = self._clock()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._since is not None:
                self._spent += self._clock() - self._since
                self._since = None

    @contextmanager
    def waiving(self) -> Iterator[None]:
        """Charge nothing for the time spent inside (a blocking read waits by design)."""
        started = self._clock()
        try:
            yield
        finally:
            if self._since is not None:
                self._since += self._clock() - started


_current: ContextVar[RedisBudget | None] = ContextVar("gptoss_redis_budget", default=None)


def open_budget(seconds: float) -> RedisBudget:
    """Give the current context (a request's thread) a fresh budget of `seconds`."""
    budget = RedisBudget(seconds)
    _current.set(budget)
    return budget


def close_budget() -> None:
    """End the current context's budget: its Redis waits are unbounded again."""
    _current.set(None)


def current_budget() -> RedisBudget | None:
    """The budget open in this context, if any."""
    return _current.get()


class _BudgetedBackoff(AbstractBackoff):
    """A back-off that never sleeps past the open budget."""

    def __init__(self, inner: AbstractBackoff):
        self._inner = inner

    def reset(self) -> None:
        self._inner.reset()

    def compute(self, failures: int) -> float:
        wait = self._inner.compute(failures)
        budget = _current.get()
        return wait if budget is None else max(0.0, min(wait, budget.left()))


class BudgetedRetry(Retry):
    """redis-py's Retry within the open budget: a command's attempts, back-off and reconnects are
    charged to it, and no attempt starts once it is spent."""

    def __init__(self, backoff: AbstractBackoff, retries: int):
        super().__init__(_BudgetedBackoff(backoff), retries)

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        budget = _current.get()
        if budget is None:
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)

        def attempt() -> T:
            budget.check()  # BudgetSpent is no connection error, so it is not retried
            return do()

        with budget.spending():
            return super().call_with_retry(attempt, fail, is_retryable, with_failure_count)


def waits_by_design(args: Sequence[Any]) -> bool:
    """The command waits on the server by design (only its name and options are read: a value may
    be large, or not text)."""
    if not args:
        return False
    name = _word(args[0])
    if name in ("XREAD", "XREADGROUP"):
        for arg in args[1:]:
            word = _word(arg)
            if word == "STREAMS":
                return False
            if word == "BLOCK":
                return True
        return False
    return name in BLOCKING_COMMANDS


def _word(arg: Any) -> str:
    return (arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)).upper()


class _BudgetedSockets(AbstractConnection):
    """A connection whose socket waits are cut to what is left of the open budget; the reply of a
    blocking command waits its own time, uncharged."""

    _blocking_reply = False

    def _connect(self) -> Any:
        budget = _current.get()
        if budget is None:
            return super()._connect()  # type: ignore[safe-super]
        configured = self.socket_connect_timeout
        self.socket_connect_timeout = budget.cap(configured)
        try:
            sock = super()._connect()  # type: ignore[safe-super]
        finally:
            self.socket_connect_timeout = configured
        sock.settimeout(budget.cap(self.socket_timeout))
        return sock

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self._blocking_reply = False  # a health-check PING may be sent first, inside
        super().send_command(*args, **kwargs)
        self._blocking_reply = waits_by_design(args)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        budget = _current.get()
        if self._sock is not None:
            self._sock.settimeout(self.socket_timeout if budget is None else budget.cap(self.socket_timeout))
        super().send_packed_command(command, check_health)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        blocking, self._blocking_reply = self._blocking_reply, False
        budget = _current.get()
        if budget is None or "timeout" in kwargs:
            return super().read_response(*args, **kwargs)
        if blocking:
            with budget.waiving():
                return super().read_response(*args, **kwargs)
        # The parser sets this timeout for the read and restores socket_timeout after it.
        return super().read_response(*args, timeout=budget.cap(self.socket_timeout), **kwargs)


class BudgetedConnection(_BudgetedSockets, Connection):
    """A TCP connection (redis://) within the open budget."""


class BudgetedSSLConnection(_BudgetedSockets, SSLConnection):
    """A TLS connection (rediss://) within the open budget."""


class BudgetedUnixConnection(_BudgetedSockets, UnixDomainSocketConnection):
    """A Unix socket connection (unix://) within the open budget."""


class BudgetedSentinelConnection(_BudgetedSockets, SentinelManagedConnection):
    """A TCP connection to the primary Sentinel names (redis+sentinel://) within the open budget."""


BUDGETED_CONNECTIONS: dict[str, type[Any]] = {  # type[Any]: redis types the Unix one abstract
    "redis": BudgetedConnection,
    "rediss": BudgetedSSLConnection,
    "unix": BudgetedUnixConnection,
    sentinel.SCHEME: BudgetedSentinelConnection,
}
"""The budgeted connection class of each URL scheme."""
