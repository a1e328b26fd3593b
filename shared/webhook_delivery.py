"""Fair webhook delivery: one FIFO queue per tenant, served round-robin by a few threads, with at most
TENANT_IN_FLIGHT attempts of one tenant under way at once. A failed attempt is not retried by a
sleeping thread: it waits, off every queue, until its backoff is over, then goes to the front of
its tenant's queue. So a tenant whose receivers hang or refuse holds at most TENANT_IN_FLIGHT
threads, and another tenant's webhook waits at most one turn of each tenant ahead of it."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import structlog

log = structlog.get_logger()

DELIVERY_THREADS = 8
"""Delivery attempts one process makes at once, all tenants together."""

TENANT_IN_FLIGHT = 2
"""Delivery attempts of one tenant under way at once in one process: a tenant whose receivers hang
holds at most this many of the DELIVERY_THREADS."""

BACKOFF_MAX = 60.0
"""Longest wait between two attempts of one message, seconds."""

Outcome = Literal["accepted", "failed", "refused"]
"""One attempt's end: the receiver took it (2xx); it failed (retried after a backoff, until the
attempts run out); or the target is refused now (given up at once)."""


@dataclass(eq=False)
class Message:
    """One webhook message on its way: what to send, for which tenant, and how it went so far."""

    message_id: str
    url: str
    body: bytes
    tenant: str
    attempts: int = 0
    future: Future[bool] = field(default_factory=Future)


def backoff(base: float, attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones: `base`, doubling, at most BACKOFF_MAX."""
    return float(min(BACKOFF_MAX, base * 2 ** max(0, attempts - 1)))


class FairDispatcher:
    """Delivers messages with `attempt` (one try, never raises) from DELIVERY_THREADS daemon threads,
    fair across tenants; `settle(message, accepted)` runs once per message when it is delivered or
    given up. A message already on its way (same id) is not taken twice."""

    def __init__(
        self,
        attempt: Callable[[Message], Outcome],
        settle: Callable[[Message, bool], None],
        *,
        attempts: int,
        backoff_base: float,
        threads: int = DELIVERY_THREADS,
        per_tenant: int = TENANT_IN_FLIGHT,
    ):
        self._attempt, self._settle = attempt, settle
        self._max_attempts, self._backoff = attempts, backoff_base
        self._threads_wanted, self._per_tenant = threads, per_tenant
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Message]] = {}
        self._turns: deque[str] = deque()  # tenants with queued messages, next to serve first
        self._in_flight: dict[str, int] = {}
        self._later: list[tuple[float, int, Message]] = []  # (due, order, message): backing off
        self._order = itertools.count()
        self._pending: dict[str, Message] = {}  # by id: queued, in flight or backing off
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, message: Message) -> Future[bool]:
        """Queue `message` behind its tenant's others; the future says whether it was accepted."""
        with self._cond:
            if self._closed:
                raise RuntimeError("webhook dispatcher is closed")
            known = self._pending.get(message.message_id)
            if known is not None:  # a redelivery of a message this process still holds
                return known.future
            self._pending[message.message_id] = message
            self._enqueue(message, front=False)
            if len(self._threads) < self._threads_wanted:
                self._start_thread()
            self._cond.notify()
        return message.future

    def pending(self) -> int:
        """Messages not yet delivered or given up."""
        with self._cond:
            return len(self._pending)

    def close(self, wait: bool = True) -> None:
        """Take no more messages; `wait`: deliver (or give up) those held first, else drop them
        (their outbox entries remain, for the sweep to send again)."""
        with self._cond:
            self._closed = True
            if not wait:
                dropped = list(self._pending.values())
                self._queues.clear()
                self._turns.clear()
                self._later.clear()
                self._pending.clear()
                for message in dropped:
                    message.future.cancel()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"webhook-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _enqueue(self, message: Message, front: bool) -> None:
        queue = self._queues.get(message.tenant)
        if queue is None:
            queue = self._queues[message.tenant] = deque()
            self._turns.append(message.tenant)
        if front:
            queue.appendleft(message)
        else:
            queue.append(message)

    def _next(self) -> Message | None:
        """The next message to try (round-robin over tenants under their in-flight cap), if any."""
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            _, _, due = heapq.heappop(self._later)
            if due.message_id in self._pending:  # not dropped by close
                self._enqueue(due, front=True)  # its wait is over: it goes before its tenant's newer ones
        for _ in range(len(self._turns)):
            tenant = self._turns.popleft()
            if self._in_flight.get(tenant, 0) >= self._per_tenant:
                self._turns.append(tenant)
                continue
            queue = self._queues[tenant]
            message = queue.popleft()
            if queue:
                self._turns.append(tenant)  # served: to the back of the turns
            else:
                del self._queues[tenant]
            self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
            return message
        return None

    def _wait_time(self) -> float | None:
        if not self._later:
            return None
        return max(0.0, self._later[0][0] - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                message = self._next()
                while message is None:
                    if self._closed and not self._queues and not self._later:
                        self._cond.notify_all()
                        return
                    self._cond.wait(self._wait_time())
                    message = self._next()
            outcome = self._try(message)
            self._done(message, outcome)

    def _try(self, message: Message) -> Outcome:
        message.attempts += 1
        try:
            return self._attempt(message)
        except Exception as exc:  # a delivery thread never dies of one message
            log.warning("webhook_attempt_error", message_id=message.message_id, error=repr(exc))
            return "failed"

    def _done(self, message: Message, outcome: Outcome) -> None:
        retry = outcome == "failed" and message.attempts < self._max_attempts
        with self._cond:
            left = self._in_flight[message.tenant] - 1
            if left:
                self._in_flight[message.tenant] = left
            else:
                del self._in_flight[message.tenant]
            if retry and message.message_id in self._pending:
                due = time.monotonic() + backoff(self._backoff, message.attempts)
                heapq.heappush(self._later, (due, next(self._order), message))
            self._cond.notify_all()  # a tenant under its cap again, or a new earliest retry
        if retry:
            return
        accepted = outcome == "accepted"
        try:
            self._settle(message, accepted)
        except Exception as exc:
            log.warning("webhook_settle_error", message_id=message.message_id, error=repr(exc))
        with self._cond:
            self._pending.pop(message.message_id, None)
        if message.future.set_running_or_notify_cancel():
            message.future.set_result(accepted)
