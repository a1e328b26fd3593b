"""The requests of this API process doing their work at once, bounded.

Under gevent every connection is a greenlet, so nothing bounds how many requests run their Redis
commands and CPU work at the same moment; a thousand arriving together would each wait behind the
others' work, and that wait, spent between a Redis command and its resumed greenlet, would use up
each request's Redis budget (503s for a Redis that is fine). A request therefore takes a slot before
its work (its budget opens after) and gives it back when its answer is built; a streamed answer
and a synchronous completion waiting for its job hold no slot while they wait. `/healthz` takes none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, Response, current_app, g, request

from shared.errors import ServiceUnavailable

UNSLOTTED_PATHS = ("/healthz",)
"""Answered without a slot: liveness touches nothing shared and must answer however busy we are."""

SLOT_WAIT = 30.0
"""Seconds a request waits for a slot before 503 + Retry-After."""


class ActiveRequests:
    """At most `limit` requests at work at once; the others wait their turn."""

    def __init__(self, limit: int, wait: float = SLOT_WAIT):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._wait = wait

    def take(self) -> None:
        """Wait for a slot, or raise ServiceUnavailable (503) after `wait` seconds."""
        if not self._slots.acquire(timeout=self._wait):
            raise ServiceUnavailable("The API is busy; retry shortly.", headers={"Retry-After": "1"})

    def give(self) -> None:
        self._slots.release()


def init_app(app: Flask) -> None:
    """Take a slot first of all before-request hooks; give it back once the answer is built (or the
    request failed before that)."""
    app.before_request_funcs.setdefault(None, []).insert(0, _take)
    app.after_request(_give)
    app.teardown_request(lambda _exc: _release())


def _take() -> None:
    if request.path in UNSLOTTED_PATHS:
        return
    _active().take()
    g.active_slot = True


def _give(response: Response) -> Response:
    _release()
    return response


def _release() -> None:
    if g.get("active_slot"):
        g.active_slot = False
        _active().give()


@contextmanager
def set_aside() -> Iterator[None]:
    """Hold no slot for the length of the block (a request that waits for its job), then take one
    again to build the answer."""
    held = bool(g.get("active_slot"))
    _release()
    try:
        yield
    finally:
        if held:
            _active().take()
            g.active_slot = True


def _active() -> ActiveRequests:
    # The app's Services hold it; read through the app, as api.services would import this module.
    active: ActiveRequests = current_app.extensions["gptoss"].active
    return active
