"""`gptoss up`: one machine's whole stack as child processes, stopped cleanly on Ctrl-C.

On a terminal it talks to its operator in plain text (on stderr, beside the children's console
logs). Otherwise its stdout holds only JSON lines: its own events (the banner is one,
`stack_starting`) and its children's JSON logs; progress bars are turned off, and whatever a child
prints that is not JSON goes to stderr.
"""

from __future__ import annotations

import json
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
import structlog

from cli import redis_server
from cli.redis_server import private_dir, write_private
from shared import keys
from shared.apikeys import authenticate, create_key
from shared.connection import connect, masked_url
from shared.logging import configure_logging
from shared.settings import Settings

STOP_GRACE = 20.0
"""Seconds each child gets to stop after SIGTERM before it is killed."""

REDIS_START_TIMEOUT = 10.0
"""Seconds to wait for our own redis-server to answer."""

REDIS_FOLDER = "redis"
"""Our own Redis's folder in the data dir: its data, config, log and kept password."""

QUIET_PROGRESS = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
"""Environment that keeps progress bars (tqdm's, the hub's) out of a non-terminal's output."""


class Announcer:
    """What `up` tells its operator: text on stderr on a terminal, one JSON event on stdout otherwise."""

    def __init__(self, pretty: bool):
        self.pretty = pretty
        self._log = structlog.get_logger()

    def say(self, event: str, text: str, level: str = "info", **fields: object) -> None:
        """Tell `text` (on a terminal), or log `event` with `fields` (as JSON)."""
        if self.pretty:
            try:
                click.echo(text, err=True)
            except OSError:  # the terminal is gone (SIGHUP): stopping goes on without it
                pass
        else:
            getattr(self._log, level)(event, **fields)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """The processes `gptoss up` started, in start order (stopped in reverse)."""

    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    announcer: Announcer = field(default_factory=lambda: Announcer(pretty=True))

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
                    self.announcer.say(
                        "child_killed", f"{name} did not stop in {STOP_GRACE:.0f} s; killing it",
                        "warning", child=name, grace_s=STOP_GRACE,
                    )  # fmt: skip
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
    client = connect(redis_url)
    if kept.exists() and authenticate(client, kept.read_text().strip()) is not None:
        return kept.read_text().strip()
    key, _ = create_key(client, keys.DEFAULT_TENANT, name="gptoss up")
    private_dir(kept.parent)
    write_private(kept, key)
    return key


def pretty_output(settings: Settings) -> bool:
    """Plain text for a person (stdout is a terminal, or GPTOSS_LOG_FORMAT=console), else JSON lines."""
    return settings.log_format == "console" or (settings.log_format == "auto" and sys.stdout.isatty())


def prepare_model(python: str, env: dict[str, str], model: str, pretty: bool) -> None:
    """`gptoss model prepare` in a child; without a terminal, only its JSON lines reach our stdout
    (the folder it prints, and anything else that is not JSON, go to stderr)."""
    argv = [python, "-m", "cli", "model", "prepare", model]
    if pretty:
        done = subprocess.run(argv, env=env)
    else:
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
        for line in done.stdout.splitlines():
            print(line, file=sys.stdout if is_json_object(line) else sys.stderr, flush=True)
    if done.returncode != 0:
        raise click.ClickException(f"could not prepare model {model}")


def is_json_object(line: str) -> bool:
    """Whether `line` is one JSON object (a log line)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def banner(settings: Settings, redis_url: str, admin_key: str, api_key: str | None, worker_ports: list[int],
           announcer: Announcer) -> None:  # fmt: skip
    """Where to go: as text on a terminal (the API key once), as one `stack_starting` event otherwise."""
    base = f"http://{settings.api_host}:{settings.api_port}"
    metrics = [f"{base}/metrics"]
    if settings.scheduler_metrics_port:
        metrics.append(f"http://{settings.metrics_host}:{settings.scheduler_metrics_port}/metrics")
    metrics += [f"http://{settings.metrics_host}:{port}/metrics" for port in worker_ports if port]
    # The password never reaches the output; our own Redis's full URL is in a file of this user's.
    url_file = None if settings.redis_given() else settings.data_dir / REDIS_FOLDER / redis_server.URL_FILE
    kept_url = f"   (the URL with its password: {url_file})" if url_file else ""
    shown_admin = admin_key if not settings.admin_key else "(GPTOSS_ADMIN_KEY)"
    try_it = f'gptoss submit "What is the capital of France?" --api-url {base}'
    key_env = "GPTOSS_API_KEY=<API key> " if api_key else ""
    announcer.say(
        "stack_starting",
        f"\ngptoss is starting: model {settings.model}\n"
        f"  Redis      {masked_url(redis_url)}{kept_url}\n"
        f"  API        {base}   (POST /v1/jobs, GET /v1/jobs/<id>)\n"
        f"  ready when {base}/readyz answers 200\n"
        f"  API key    {api_key or 'none needed (GPTOSS_AUTH=false)'}   (Authorization: Bearer …)\n"
        f"  admin key  {shown_admin}   (for /admin/*)\n"
        f"  metrics    {', '.join(metrics)}\n"
        f"  try        {key_env}{try_it}\n"
        f"Ctrl-C stops everything.\n",
        model=settings.model, redis=masked_url(redis_url), redis_url_file=str(url_file) if url_file else None,
        api=base, ready=f"{base}/readyz", api_key=api_key, admin_key=shown_admin, metrics=metrics,
    )  # fmt: skip


def run_stack(settings: Settings) -> int:
    """Start the stack, print where to go, wait for Ctrl-C or a child's death; an exit code."""
    pretty = pretty_output(settings)
    if not pretty:
        configure_logging(settings, "up")
    announcer = Announcer(pretty)
    stack = Stack(announcer=announcer)
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # SIGHUP too: a closed terminal stops the stack cleanly (the children, in their own sessions,
    # would otherwise outlive it).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    try:
        redis_url = (
            settings.redis_url_or_default()
            if settings.redis_given()
            else start_redis(stack, settings.data_dir, settings.redis_appendfsync)
        )
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else secrets.token_urlsafe(24)
        env = {
            **os.environ,
            **({} if pretty else QUIET_PROGRESS),
            "GPTOSS_REDIS_URL": redis_url,
            "GPTOSS_MODEL": settings.model,
            "GPTOSS_ADMIN_KEY": admin_key,
        }
        if settings.profile:
            env["GPTOSS_PROFILE"] = settings.profile
        python = sys.executable
        prepare_model(python, env, settings.model, pretty)
        stack.start("api", [python, "-m", "api"], {**env, "GPTOSS_API_PORT": str(settings.api_port)})
        stack.start("scheduler", [python, "-m", "scheduler"], env)
        worker_ports = []
        for offset, queue in enumerate(keys.WORKER_QUEUES):
            # Each worker's /metrics on its own port: the configured one, then the next.
            port = settings.worker_metrics_port + offset if settings.worker_metrics_port else 0
            worker_ports.append(port)
            worker_env = {**env, "GPTOSS_WORKER_QUEUE": queue, "GPTOSS_WORKER_METRICS_PORT": str(port)}
            stack.start(f"worker:{queue}", [python, "-m", "workers"], worker_env)
        api_key = client_key(redis_url, settings) if settings.auth else None
        banner(settings, redis_url, admin_key, api_key, worker_ports, announcer)
        while not stopping:
            if (dead := stack.exited()) is not None:
                announcer.say(
                    "child_exited", f"{dead[0]} exited with code {dead[1]}; stopping the stack", "error",
                    child=dead[0], code=dead[1],
                )  # fmt: skip
                return 1
            time.sleep(0.2)
        return 0
    finally:
        announcer.say("stack_stopping", "stopping…")
        stack.stop()
        announcer.say("stack_stopped", "stopped")
