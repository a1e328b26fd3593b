"""Connections: can the API be frozen by clients that hold their connections open?

Starts Redis and the API of `gptoss up` with no scheduler and no worker, so every job waits and
every stream on it stays open; budgets and rate limits are raised and the load is spread over ten
tenants, so the per-tenant caps are not what is measured. Then opens, and holds:
- `--streams` SSE streams (`GET /v1/jobs/<id>/events`) on waiting jobs,
- `--waits` synchronous chat completions waiting for their jobs,
- `--heads` slow request heads that never end (each re-opened when the API closes it),
while another client measures `GET /healthz` and `POST /v1/jobs` (202). Prints p50/p99 of both, the
API's memory and its number of Redis connections, for each worker class given (gevent, the default
since the front-door issue, and gthread, the 16 threads it replaced), and writes JSON to
bench/results/.

    .venv/bin/python bench/connections.py [--streams 1000 --waits 200 --heads 200] [--mode gevent]
"""

from __future__ import annotations

import json
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import Cluster, write_results  # noqa: E402
from shared.apikeys import create_key  # noqa: E402

TENANTS = 10
MODEL = "smollm2-135m"
JOB = {"messages": [{"role": "user", "content": "Hold this line."}], "max_tokens": 8, "temperature": 0}
HOLD = 20.0
"""Seconds the connections are held at least (the API's head timeout is 10 s)."""
TRICKLE_EVERY = 2.0
"""Seconds between two header lines of a slow head (the API's head timeout closes it first)."""


class Holder:
    """Holds raw client connections open without reading them (a waiting stream sends a keep-alive a
    second, which the kernel's buffers absorb), and keeps `heads` slow request heads going."""

    def __init__(self, host: str, port: int):
        self.address = (host, port)
        self.sockets: list[socket.socket] = []
        self.heads: list[socket.socket] = []
        self.heads_closed = 0
        self.selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, request: bytes) -> None:
        sock = socket.create_connection(self.address, timeout=10)
        sock.sendall(request)
        self.sockets.append(sock)

    def open_head(self) -> None:
        sock = socket.create_connection(self.address, timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n")
        sock.setblocking(False)
        self.heads.append(sock)
        self.selector.register(sock, selectors.EVENT_READ)

    def keep_heads(self, count: int) -> None:
        """Open `count` slow heads and keep that many open until `close`."""
        for _ in range(count):
            self.open_head()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                self.selector.unregister(sock)
                sock.close()
                self.heads.remove(sock)
                self.heads_closed += 1
                self.open_head()
            if time.monotonic() - last >= TRICKLE_EVERY:
                last = time.monotonic()
                for sock in list(self.heads):
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                    except OSError:
                        pass

    def statuses(self) -> dict[str, int]:
        """The status line each held connection got so far (none: the API never answered)."""
        counts: dict[str, int] = {}
        for sock in self.sockets:
            sock.settimeout(0.05)
            try:
                first = sock.recv(64).split(b"\r\n")[0].decode(errors="replace")
                status = (
                    first.split(" ")[1] if first.startswith("HTTP/") else ("closed" if not first else "?")
                )
            except OSError:
                status = "none"
            counts[status] = counts.get(status, 0) + 1
        return counts

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self.sockets + self.heads:
            sock.close()


def http_request(method: str, path: str, key: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    ordered = sorted(values)
    at = lambda q: round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 2)  # noqa: E731
    return {
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "mean_ms": round(statistics.mean(values) * 1000, 2),
        "n": len(values),
    }


def measure(base: str, key: str, samples: int, timeout: float) -> dict[str, Any]:
    """`samples` of /healthz and of POST /v1/jobs, alternating, on one kept-alive session each."""
    health, submit = requests.Session(), requests.Session()
    submit.headers["Authorization"] = f"Bearer {key}"
    times: dict[str, list[float]] = {"healthz": [], "submit": []}
    failures: dict[str, int] = {"healthz": 0, "submit": 0}
    for _ in range(samples):
        for name, call in (
            ("healthz", lambda: health.get(f"{base}/healthz", timeout=timeout)),
            ("submit", lambda: submit.post(f"{base}/v1/jobs", json=JOB, timeout=timeout)),
        ):
            started = time.perf_counter()
            try:
                ok = call().status_code in (200, 202)
            except requests.RequestException:
                ok = False
            if ok:
                times[name].append(time.perf_counter() - started)
            else:
                failures[name] += 1
    return {name: {**percentiles(times[name]), "failed": failures[name]} for name in times}


def api_footprint(cluster: Cluster, redis_port: int) -> dict[str, Any]:
    """The API's processes' resident memory and their TCP connections to Redis."""
    root = psutil.Process(cluster.children["api"].pid)
    tree = [root, *root.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in tree)
    redis_connections = sum(
        1 for p in tree for c in p.net_connections(kind="tcp") if c.raddr and c.raddr.port == redis_port
    )
    return {"api_rss_mib": round(rss / 2**20, 1), "api_redis_connections": redis_connections}


def run_mode(mode: str, streams: int, waits: int, heads: int, samples: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"gptoss-connections-{mode}-"))
    many = str(10**6)
    cluster = Cluster(
        folder,
        {
            "GPTOSS_API_WORKER_CLASS": mode,
            "GPTOSS_MODEL": MODEL,
            "GPTOSS_BACKLOG_BUDGET": many,
            "GPTOSS_TENANT_BACKLOG_BUDGET": many,
            "GPTOSS_RATE_LIMIT_REQUESTS": many,
            "GPTOSS_RATE_LIMIT_TOKENS": str(10**9),
            "GPTOSS_API_STREAMS_PER_TENANT": many,
            "GPTOSS_RESPONSE_CACHE": "false",
            "GPTOSS_AUTH": "true",
            "GPTOSS_OBSERVABILITY": "true",
        },
    )
    holder = Holder("127.0.0.1", cluster.api_port)
    try:
        # The API counts each prompt's tokens with the model's tokenizer: prepared as `gptoss up` does.
        subprocess.run(
            [sys.executable, "-m", "cli", "model", "prepare", MODEL], cwd=ROOT, env=cluster.env, check=True
        )
        cluster.start_redis()
        tenant_keys = [create_key(cluster.redis, f"bench-{i}")[0] for i in range(TENANTS)]
        cluster.start("api", "api")
        deadline, log = time.monotonic() + 120, folder / "api.log"
        while time.monotonic() < deadline:  # up, with the prompt tokenizer it warms as it starts
            if log.exists() and "prompt_tokenizer_loaded" in log.read_text(errors="replace"):
                break
            time.sleep(0.2)
        baseline = measure(cluster.base, tenant_keys[0], 50, 5)

        def submit(i: int) -> str:
            key = tenant_keys[i % TENANTS]
            answer = requests.post(
                f"{cluster.base}/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {key}"}, timeout=30
            )
            answer.raise_for_status()
            return str(answer.json()["id"])

        with ThreadPoolExecutor(8) as pool:
            job_ids = list(pool.map(submit, range(streams)))
        opening = time.perf_counter()
        for i, job_id in enumerate(job_ids):
            holder.open(http_request("GET", f"/v1/jobs/{job_id}/events", tenant_keys[i % TENANTS]))
        for i in range(waits):
            holder.open(http_request("POST", "/v1/chat/completions", tenant_keys[i % TENANTS], JOB))
        holder.keep_heads(heads)
        opened_s = time.perf_counter() - opening
        # Measure while they are held, once the API has taken every one in (each waiting
        # completion's job submitted, every stream answered): the storm of arrivals is timed apart.
        expected = 50 + streams + waits  # the baseline's submissions, the streams' jobs, the waits'
        deadline = time.monotonic() + 300
        submitted = lambda: log.read_text(errors="replace").count('"job_submitted"')  # noqa: E731
        while time.monotonic() < deadline and submitted() < expected:
            time.sleep(0.2)
        absorbed_s = time.perf_counter() - opening
        loaded = measure(cluster.base, tenant_keys[0], samples, 5 if mode == "gevent" else 3)
        while time.perf_counter() - opening < HOLD:  # long enough for the head timeout to cut some
            time.sleep(0.5)
        footprint = api_footprint(cluster, cluster.port)
        statuses = holder.statuses()
        return {
            "mode": mode,
            "held": {"streams": streams, "sync_waits": waits, "slow_heads": heads},
            "opened_s": round(opened_s, 2),
            "absorbed_s": round(absorbed_s, 2),
            "baseline": baseline,
            "under_load": loaded,
            "held_statuses": statuses,
            "slow_heads_closed_by_api": holder.heads_closed,
            **footprint,
        }
    finally:
        holder.close()
        cluster.stop()


@click.command()
@click.option("--streams", default=1000, show_default=True, help="SSE streams held open.")
@click.option("--waits", default=200, show_default=True, help="Synchronous completions held waiting.")
@click.option("--heads", default=200, show_default=True, help="Slow, never-ending request heads.")
@click.option("--samples", default=200, show_default=True, help="Measurements of each call under load.")
@click.option("--mode", "modes", multiple=True, default=("gevent", "gthread"), show_default=True)
def main(streams: int, waits: int, heads: int, samples: int, modes: tuple[str, ...]) -> None:
    """Hold thousands of connections open; measure /healthz and submissions meanwhile."""
    flags = sorted(
        {f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512_bf16", "amx_bf16")}
    )
    runs = []
    for mode in modes:
        record = run_mode(mode, streams, waits, heads, samples if mode == "gevent" else min(samples, 20))
        runs.append(record)
        load = record["under_load"]
        print(
            f"{mode:8s} healthz p50 {load['healthz']['p50_ms']} ms p99 {load['healthz']['p99_ms']} ms "
            f"(failed {load['healthz']['failed']}); submit p50 {load['submit']['p50_ms']} ms "
            f"p99 {load['submit']['p99_ms']} ms (failed {load['submit']['failed']}); "
            f"API {record['api_rss_mib']} MiB, {record['api_redis_connections']} Redis connections; "
            f"held answered {record['held_statuses']} (taken in within {record['absorbed_s']} s); "
            f"slow heads closed {record['slow_heads_closed_by_api']}"
        )
    path = write_results("connections", {"cpu_flags": flags, "cores": psutil.cpu_count(), "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
