"""The open streams of each tenant in this API process: a request that holds its connection for
as long as a job runs (an SSE stream, a streamed or synchronous completion) takes a slot, and a
tenant past its cap is refused with 429, so no tenant can take every connection a process has."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from shared.errors import TooManyStreams

RETRY_AFTER = "5"
"""Seconds a client refused a stream is told to wait (streams end as their jobs do)."""


class StreamSlots:
    """At most `per_tenant` open streams for each tenant in this process."""

    def __init__(self, per_tenant: int):
        self.per_tenant = per_tenant
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, tenant: str) -> None:
        """Take one of `tenant`'s slots, or raise TooManyStreams (429)."""
        with self._lock:
            if self._open[tenant] >= self.per_tenant:
                raise TooManyStreams(
                    f"This tenant has {self.per_tenant} streams open on this server, its cap; "
                    "close one or retry later.",
                    headers={"Retry-After": RETRY_AFTER},
                )
            self._open[tenant] += 1

    def give(self, tenant: str) -> None:
        """Give back one of `tenant`'s slots."""
        with self._lock:
            self._open[tenant] -= 1
            if self._open[tenant] <= 0:
                del self._open[tenant]

    @contextmanager
    def held(self, tenant: str) -> Iterator[None]:
        """One slot of `tenant` for the length of the block."""
        self.take(tenant)
        try:
            yield
        finally:
            self.give(tenant)

    def open(self, tenant: str) -> int:
        """Streams `tenant` has open now."""
        return self._open.get(tenant, 0)
