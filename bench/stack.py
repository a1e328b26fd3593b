"""What the benchmark scripts share about a running stack: waiting until it is ready, and following
one job to its settled view as a client would."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import requests


def wait_ready(base: str, timeout: float = 240, up: subprocess.Popen | None = None) -> None:
    """Until the API at `base` answers /readyz with 200; exits after `timeout` s or once `up` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (up is None or up.poll() is None):
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{base} not ready in {timeout} s")


def settled_view(client: Any, base: str, job: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """The job's view once it has ended: its event stream followed to `done` or `error` (one request,
    as a client would; tight polling would compete with the worker for the CPU), then polled until
    RQ has settled it. `client` is `requests` or a `requests.Session`."""
    with client.get(f"{base}{job['url']}/events", stream=True, timeout=timeout) as events:
        for line in events.iter_lines(decode_unicode=True):
            if line in ("event: done", "event: error"):
                break
    view = client.get(f"{base}{job['url']}", timeout=30).json()
    while view["status"] not in ("finished", "failed", "rejected"):  # RQ settles just after `done`
        time.sleep(0.01)
        view = client.get(f"{base}{job['url']}", timeout=30).json()
    return view
