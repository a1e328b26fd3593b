"""What the benchmark scripts share about a running stack: waiting until it is ready, following
one job to its settled view as a client would, writing the figures; and for the fault benchmarks a
cluster of child processes to signal one by one, and a local webhook receiver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from redis import Redis
from redis.exceptions import RedisError

from cli import redis_server
from cli.up import free_port
from shared import keys

ROOT = Path(__file__).resolve().parent.parent


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


def cpu_flags() -> dict[str, bool]:
    """Which of the CPU features that decide a CPU model's speed this machine has (Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return {name: name in flags for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}


def write_results(name: str, record: dict[str, Any]) -> Path:
    """`record` written as bench/results/<name>.json (the folder made if missing); the file."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out


class Cluster:
    """Redis (AOF, appendfsync always, a password), the API, the scheduler and workers as child
    processes in one folder, each started, signalled, replaced and stopped by name. `env` is added to
    every child's environment (no GPTOSS_* variable of ours leaks in); `fsync` is the AOF's policy
    (`everysec` is what `gptoss up` runs by default)."""

    def __init__(self, folder: Path, env: dict[str, str], fsync: str = "always"):
        self.folder, self.port, self.api_port = folder, free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        # Locked as `gptoss up` locks its own: a kept password in a config file, private files.
        self.redis_config, redis_url = redis_server.prepare(folder, self.port, fsync)
        self.redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.children: dict[str, subprocess.Popen] = {}
        self.modules: dict[str, tuple[str, dict[str, str]]] = {}
        self.killed: set[str] = set()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
        self.env.update(
            {
                "GPTOSS_REDIS_URL": redis_url,
                "GPTOSS_API_PORT": str(self.api_port),
                "GPTOSS_LOG_FORMAT": "json",
                "GPTOSS_SCHEDULER_METRICS_PORT": "0",
                "GPTOSS_WORKER_METRICS_PORT": "0",
                **env,
            }
        )
        self._serial: Counter[str] = Counter()

    def start_redis(self, timeout: float = 30) -> None:
        """Start redis-server on the cluster's port and folder (its AOF replayed); wait until it answers."""
        argv = [shutil.which("redis-server") or "redis-server", str(self.redis_config)]
        self.children["redis"] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, umask=redis_server.PRIVATE_UMASK
        )
        self.killed.discard("redis")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.redis.ping():
                    return
            except RedisError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def start(self, name: str, module: str, **extra: str) -> subprocess.Popen:
        """Start `python -m module` as child `name` (its log in the folder)."""
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115
        child = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env={**self.env, **extra}, stdout=log, stderr=log
        )
        self.children[name], self.modules[name] = child, (module, extra)
        self.killed.discard(name)
        return child

    def start_all(self, ready_timeout: float = 240) -> None:
        """Redis, the API, the scheduler and a worker per worker queue, as `gptoss up` runs them;
        returns once the API says it is ready."""
        self.start_redis()
        self.start("api", "api")
        self.start("scheduler", "scheduler")
        for queue in keys.WORKER_QUEUES:
            self.start_worker(queue)
        wait_ready(self.base, ready_timeout)

    def start_worker(self, queue: str) -> str:
        """Start one more worker of `queue`; its child's name."""
        self._serial[queue] += 1
        name = f"worker-{queue}-{self._serial[queue]}"
        self.start(name, "workers", GPTOSS_WORKER_QUEUE=queue)
        return name

    def name_of(self, pid: int) -> str | None:
        """The child with process id `pid`, if it is one of ours."""
        return next((n for n, c in self.children.items() if c.pid == pid), None)

    def running(self, name: str | None) -> bool:
        """Child `name` is one of ours and has not exited."""
        return name is not None and name in self.children and self.children[name].poll() is None

    def signal(self, name: str, signum: int) -> None:
        """Send `signum` to child `name` (a SIGKILL is remembered: the child did not exit by itself)."""
        if signum == signal.SIGKILL:
            self.killed.add(name)
        self.children[name].send_signal(signum)
        if signum == signal.SIGKILL:
            self.children[name].wait(10)

    def exited(self) -> list[str]:
        """Children that exited by themselves (not killed by the bench)."""
        return [n for n, c in self.children.items() if c.poll() is not None and n not in self.killed]

    def heal(self) -> list[str]:
        """Restart Redis, the API or the scheduler if it is not running, and start a worker for each
        worker queue without a running one; what was started."""
        started = []
        for name in ("redis", "api", "scheduler"):
            child = self.children.get(name)
            if child is not None and child.poll() is None:
                continue
            if name == "redis":
                self.start_redis()
            else:
                self.start(name, self.modules.get(name, (name, {}))[0])
            started.append(name)
        for queue in keys.WORKER_QUEUES:
            running = [
                n for n, c in self.children.items() if n.startswith(f"worker-{queue}-") and c.poll() is None
            ]
            if not running:
                started.append(self.start_worker(queue))
        return started

    def stop(self) -> None:
        """Stop every child (continued first, in case one is stopped), Redis last."""
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGCONT)
        for name, child in reversed(list(self.children.items())):
            if child.poll() is None and name != "redis":
                child.terminate()
        for name, child in self.children.items():
            if name == "redis":
                continue
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)
        redis = self.children.get("redis")
        if redis is not None and redis.poll() is None:
            redis.terminate()
            redis.wait(30)


class WebhookReceiver:
    """A local HTTP endpoint that accepts every webhook and counts, per job, its deliveries and its
    distinct `webhook-id`s (one logical event per job: redeliveries reuse the id)."""

    def __init__(self) -> None:
        self.ids: dict[str, set[str]] = defaultdict(set)
        self.deliveries: Counter[str] = Counter()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    job_id = str(json.loads(body)["data"]["id"])
                except (ValueError, KeyError, TypeError):
                    job_id = "?"
                with receiver._lock:
                    receiver.ids[job_id].add(self.headers.get("webhook-id") or "")
                    receiver.deliveries[job_id] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def ids_of(self, job_id: str) -> int:
        """Distinct webhook ids received for `job_id`."""
        with self._lock:
            return len(self.ids.get(job_id, ()))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_transformers_serve(folder: Path, dtype: str, work: Path) -> tuple[subprocess.Popen, str]:
    """`transformers serve --continuous-batching` on the weights in `folder`, offline, its log in
    `work`: (the process, its base URL). The caller waits for it (`wait_ready(..., path="/health")`)."""
    port = free_port()
    binary = Path(sys.executable).parent / "transformers"
    log = open(work / "serve.log", "wb")  # noqa: SIM115
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    serve = subprocess.Popen(
        [str(binary), "serve", str(folder), "--continuous-batching", "--port", str(port),
         "--cb-max-memory-percent", "0.1", "--dtype", dtype],
        stdout=log, stderr=log, env=env, start_new_session=True,
    )  # fmt: skip
    return serve, f"http://localhost:{port}"
