"""When a request arrived: stamped by the outermost WSGI layer, before its body is read or parsed, so
the job's `received` (what TTFT, E2E and queue time count from) is what the client's clock sees less
the network."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import request

ARRIVED = "gptoss.arrived"
"""WSGI environ key of the request's arrival time (unix seconds)."""


class ArrivalMiddleware:
    """Stamps when the request reached the app (its head read, its body not yet); a layer in front
    that stamped it earlier (a server that knows when the head came) is kept."""

    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ.setdefault(ARRIVED, time.time())
        return self._app(environ, start_response)


def arrived() -> float:
    """Unix time the current request reached the app (now, for an app without the middleware)."""
    stamp = request.environ.get(ARRIVED)
    return stamp if isinstance(stamp, float) else time.time()
