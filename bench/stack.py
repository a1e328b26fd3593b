"""What the benchmark scripts share about a running stack: waiting until it is ready, and following
one job to its settled view as a client would, and writing the figures."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import requests


def wait_ready(
    base: str, timeout: float = 240, up: subprocess.Popen | None = None, path: str = "/readyz"
) -> None:
    """Until the server at `base` answers `path` with 200; exits after `timeout` s or once `up` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (up is None or up.poll() is None):
        try:
            if requests.get(f"{base}{path}", timeout=2).status_code == 200:
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


def write_results(name: str, record: dict[str, Any]) -> Path:
    """`record` written as bench/results/<name>.json (the folder made if missing); the file."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out
