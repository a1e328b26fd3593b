"""`gptoss up`: one machine's whole stack as child processes, stopped cleanly on Ctrl-C."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import redis as redis_py

from cli import redis_server
from cli.redis_server import private_dir, write_private
from shared import keys
from shared.apikeys import authenticate, create_key
from shared.connection import masked_url
from shared.settings import Settings

STOP_GRACE = 20.0
"""Seconds each child gets to stop after SIGTERM before it is killed."""

REDIS_START_TIMEOUT = 10.0
"""Seconds to wait for our own redis-server to answer."""

REDIS_FOLDER = "redis"
"""Our own Redis's folder in the data dir: its data, config, log and kept password."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """The processes `gptoss up` started, in start order (stopped in reverse)."""

    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], umask: int = -1) -> subprocess.Popen:
        """Start child `name` (under `umask` when it is not -1)."""
        # Each child in its own session: Ctrl-C reaches only `up`, which stops them in order.
        child = subprocess.Popen(argv, env=env, start_new_session=True, umask=umask)
        self.children.append((name, child))
        return child

    def exited(self) -> tuple[str, int] | None:
        """The first child that has exited, with its code."""
        for name, child in self.children:
            if (code := child.poll()) is not None:
                return name, code
        return None

    def stop(self) -> None:
        """SIGTERM every child, newest first, waiting for each; kill what outlives the grace."""
        for name, child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    click.echo(f"{name} did not stop in {STOP_GRACE:.0f} s; killing it", err=True)
                    child.kill()
                    child.wait()


def start_redis(stack: Stack, data_dir: Path, fsync: str = "everysec") -> str:
    """Start a redis-server from PATH on a free port, locked (see cli/redis_server.py), its data and
    AOF persistence (`fsync`: everysec or always) in `data_dir`/redis; its URL, password included."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise click.ClickException("redis-server is not on PATH; install it or set GPTOSS_REDIS_URL")
    private_dir(data_dir)
    folder = data_dir / REDIS_FOLDER
    port = free_port()
    config, url = redis_server.prepare(folder, port, fsync)
    server = stack.start("redis", [binary, str(config)], dict(os.environ), umask=redis_server.PRIVATE_UMASK)
    client = redis_py.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + REDIS_START_TIMEOUT
    while True:
        try:
            client.ping()
            client.close()
            return url
        except redis_py.ConnectionError:
            if server.poll() is not None:
                raise click.ClickException(
                    f"redis-server exited with code {server.returncode}; see {folder / redis_server.LOG_FILE}"
                ) from None
            if time.monotonic() > deadline:
                raise click.ClickException(f"redis-server did not answer on port {port}") from None
            time.sleep(0.05)


def client_key(redis_url: str, settings: Settings) -> str:
    """An API key for the operator of this stack: the one kept in the data dir while it still
    authenticates, else a new one (for tenant `default`), kept there for next time."""
    kept = settings.data_dir / "api-key"
    client = redis_py.Redis.from_url(redis_url)
    if kept.exists() and authenticate(client, kept.read_text().strip()) is not None:
        return kept.read_text().strip()
    key, _ = create_key(client, keys.DEFAULT_TENANT, name="gptoss up")
    private_dir(kept.parent)
    write_private(kept, key)
    return key


def run_stack(settings: Settings) -> int:
    """Start the stack, print where to go, wait for Ctrl-C or a child's death; an exit code."""
    stack = Stack()
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        redis_url = settings.redis_url or start_redis(stack, settings.data_dir, settings.redis_appendfsync)
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "GPTOSS_REDIS_URL": redis_url,
            "GPTOSS_MODEL": settings.model,
            "GPTOSS_ADMIN_KEY": admin_key,
        }
        if settings.profile:
            env["GPTOSS_PROFILE"] = settings.profile
        python = sys.executable
        prepared = subprocess.run([python, "-m", "cli", "model", "prepare", settings.model], env=env)
        if prepared.returncode != 0:
            raise click.ClickException(f"could not prepare model {settings.model}")
        stack.start("api", [python, "-m", "api"], {**env, "GPTOSS_API_PORT": str(settings.api_port)})
        stack.start("scheduler", [python, "-m", "scheduler"], env)
        worker_ports = {}
        for offset, queue in enumerate(keys.WORKER_QUEUES):
            # Each worker's /metrics on its own port: the configured one, then the next.
            port = settings.worker_metrics_port + offset if settings.worker_metrics_port else 0
            worker_ports[queue] = port
            worker_env = {**env, "GPTOSS_WORKER_QUEUE": queue, "GPTOSS_WORKER_METRICS_PORT": str(port)}
            stack.start(f"worker:{queue}", [python, "-m", "workers"], worker_env)
        base = f"http://{settings.api_host}:{settings.api_port}"
        api_key = client_key(redis_url, settings) if settings.auth else None
        key_env = f"GPTOSS_API_KEY={api_key} " if api_key else ""
        metrics = ", ".join(f":{p}/metrics" for p in worker_ports.values() if p)
        # The password never reaches the terminal; our own Redis's full URL is in a file of this user's.
        url_file = settings.data_dir / REDIS_FOLDER / redis_server.URL_FILE
        kept_url = "" if settings.redis_url else f"   (the URL with its password: {url_file})"
        click.echo(
            f"\ngptoss is starting: model {settings.model}\n"
            f"  Redis      {masked_url(redis_url)}{kept_url}\n"
            f"  API        {base}   (POST /v1/jobs, GET /v1/jobs/<id>)\n"
            f"  ready when {base}/readyz answers 200\n"
            f"  API key    {api_key or 'none needed (GPTOSS_AUTH=false)'}   (Authorization: Bearer …)\n"
            f"  admin key  {admin_key if not settings.admin_key else '(GPTOSS_ADMIN_KEY)'}   (for /admin/*)\n"
            f"  metrics    {base}/metrics, scheduler :{settings.scheduler_metrics_port}/metrics"
            f"{', workers ' + metrics if metrics else ''}\n"
            f'  try        {key_env}gptoss submit "What is the capital of France?" --api-url {base}\n'
            f"Ctrl-C stops everything.\n",
            err=True,
        )
        while not stopping:
            if (dead := stack.exited()) is not None:
                click.echo(f"{dead[0]} exited with code {dead[1]}; stopping the stack", err=True)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        click.echo("stopping…", err=True)
        stack.stop()
        click.echo("stopped", err=True)
