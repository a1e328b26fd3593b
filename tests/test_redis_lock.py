"""`gptoss up`'s own Redis is locked to its user: a kept password, private files, no password on a
command line or a terminal; and the whole stack works on it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from redis import Redis
from redis.exceptions import AuthenticationError

from cli import redis_server
from cli.redis_server import kept_password, server_config
from cli.up import Stack, free_port, start_redis
from shared.connection import masked_url
from shared.settings import Settings
from tests.conftest import ROOT, http_ok, process_env, wait_for

TINY = "tiny-gpt-oss"

StartRedis = Callable[[Path], tuple[str, subprocess.Popen]]
"""start_redis on a data dir, as `gptoss up` calls it; (its URL, the redis-server process)."""


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture
def own_redis() -> Iterator[StartRedis]:
    """Factory: start_redis as `gptoss up` calls it, on a data dir; (URL, redis-server). Stopped at
    teardown (and by the test, to restart on the same data)."""
    stacks: list[Stack] = []

    def start(data_dir: Path) -> tuple[str, subprocess.Popen]:
        stack = Stack()
        stacks.append(stack)
        url = start_redis(stack, data_dir)
        return url, stack.children[-1][1]

    yield start
    for stack in stacks:
        stack.stop()


def test_a_client_without_the_password_is_refused(own_redis: StartRedis, tmp_path: Path) -> None:
    url, _ = own_redis(tmp_path / "data")
    port = port_of(url)
    with pytest.raises(AuthenticationError):  # NOAUTH: RESP2 sends the command straight away
        Redis(port=port, protocol=2).set("gptoss:stolen", "admin")
    with pytest.raises(AuthenticationError):  # HELLO without credentials
        Redis(port=port).get("gptoss:stolen")
    with pytest.raises(AuthenticationError):
        Redis(port=port, password="guess").ping()
    with Redis.from_url(url) as client:
        assert client.set("gptoss:mine", "1") and client.get("gptoss:mine") == b"1"
        assert client.exists("gptoss:stolen") == 0


def test_its_files_only_its_user_can_read(own_redis: StartRedis, tmp_path: Path) -> None:
    data = tmp_path / "data"
    url, _ = own_redis(data)
    with Redis.from_url(url) as client:
        client.set("prompt", "a secret prompt")
    folder = data / "redis"
    assert mode(data) == 0o700 and mode(folder) == 0o700
    for name in ("password", "redis.conf", "url", "redis.log"):
        assert mode(folder / name) == 0o600, name

    def prompt_in_aof() -> bool:
        return any(b"a secret prompt" in p.read_bytes() for p in (folder / "appendonlydir").glob("*.aof"))

    wait_for(prompt_in_aof, 10, "the prompt to reach the AOF")  # the file this is all about
    for path in folder.rglob("*"):
        assert mode(path) & 0o077 == 0, f"{path} is readable by others: {oct(mode(path))}"


def test_an_older_data_dir_is_locked_too(own_redis: StartRedis, tmp_path: Path) -> None:
    """A data dir the user made stays as it is; the Redis folder and a loosened password are ours."""
    data, folder = tmp_path / "data", tmp_path / "data" / "redis"
    folder.mkdir(parents=True)
    data.chmod(0o755)
    folder.chmod(0o755)
    (folder / "password").write_text("kept-before\n")
    (folder / "password").chmod(0o644)
    url, _ = own_redis(data)
    assert mode(data) == 0o755 and mode(folder) == 0o700 and mode(folder / "password") == 0o600
    assert Redis.from_url(url).ping() and ":kept-before@" in url


def test_the_password_is_on_no_command_line(own_redis: StartRedis, tmp_path: Path) -> None:
    url, server = own_redis(tmp_path / "data")
    password = (tmp_path / "data" / "redis" / "password").read_text().strip()
    assert password and f":{password}@" in url
    assert isinstance(server.args, list)  # the argv `gptoss up` gave redis-server
    assert server.args and not any(password in str(arg) for arg in server.args)
    assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()


def test_a_second_start_reuses_the_password_and_reads_the_data(own_redis: StartRedis, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first, server = own_redis(data)
    with Redis.from_url(first) as client:
        client.set("gptoss:job", "accepted")
    server.terminate()  # a clean stop: redis-server flushes its AOF
    assert server.wait(30) == 0
    second, _ = own_redis(data)
    assert second.split("@")[0] == first.split("@")[0]  # the same password
    assert (data / "redis" / "url").read_text().strip() == second
    with Redis.from_url(second) as client:
        assert client.get("gptoss:job") == b"accepted"


def test_a_redis_server_that_cannot_start_says_where_its_log_is(
    own_redis: StartRedis, tmp_path: Path
) -> None:
    import click

    data = tmp_path / "data"
    (data / "redis" / "appendonlydir").mkdir(parents=True)
    (data / "redis" / "appendonlydir" / "appendonly.aof.manifest").write_text("not a manifest\n")
    with pytest.raises(click.ClickException, match="redis.log"):
        own_redis(data)


def test_masked_url_hides_only_the_password() -> None:
    assert masked_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert masked_url("rediss://app:s3cret@redis.example:6380/1") == "rediss://app:***@redis.example:6380/1"
    assert masked_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_config_quotes_what_it_is_given(tmp_path: Path) -> None:
    folder = tmp_path / 'a "quoted" dir'
    text = server_config(folder, 7000, "pass word", "always")
    assert 'dir "' + str(folder).replace('"', '\\"') + '"' in text.splitlines()
    assert 'requirepass "pass word"' in text.splitlines() and "appendfsync always" in text.splitlines()


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("\n")
    with pytest.raises(RuntimeError, match="empty"):
        kept_password(tmp_path / "password")
    fresh = kept_password(tmp_path / "new")
    assert len(fresh) >= 40 and kept_password(tmp_path / "new") == fresh


# --- the whole stack on the password -----------------------------------------------------------


@dataclass(frozen=True)
class LockedStack:
    """A running `gptoss up` with its own Redis: its API, data dir, process and output."""

    base: str
    data: Path
    up: subprocess.Popen
    log: Path

    def redis_url(self) -> str:
        return (self.data / "redis" / redis_server.URL_FILE).read_text().strip()

    def api_key(self) -> str:
        return (self.data / "api-key").read_text().strip()


ADMIN_KEY = "locked-stack-admin"


@pytest.fixture(scope="module")
def locked_stack(
    prepared_models: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LockedStack]:
    """`gptoss up` on tiny-gpt-oss with auth on (its API key made in its Redis) and an admin key."""
    folder = tmp_path_factory.mktemp("locked")
    port = free_port()
    env = process_env(
        GPTOSS_API_PORT=port, GPTOSS_DATA_DIR=folder / "data", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_MODEL=TINY, GPTOSS_AUTH="true", GPTOSS_ADMIN_KEY=ADMIN_KEY,
    )  # fmt: skip
    log = folder / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "cli", "up"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{base}/readyz") or up.poll() is not None, 180, "the stack to be ready")
        assert up.poll() is None, log.read_text()[-3000:]
        yield LockedStack(base, folder / "data", up, log)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(60)


def test_every_process_works_on_the_password(locked_stack: LockedStack) -> None:
    """Ready means the scheduler and both workers heartbeat in the locked Redis; a job runs through."""
    stack = locked_stack
    url = stack.redis_url()
    with pytest.raises(AuthenticationError):
        Redis(port=port_of(url), protocol=2).keys("*")
    headers = {"Authorization": f"Bearer {stack.api_key()}"}  # made by `up` in the locked Redis
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Hi!"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    answer = requests.post(f"{stack.base}/v1/jobs", json=body, headers=headers, timeout=10)
    assert answer.status_code == 202, answer.text
    job_url = f"{stack.base}{answer.json()['url']}"
    view: dict = {}

    def ended() -> bool:
        nonlocal view
        view = requests.get(job_url, headers=headers, timeout=5).json()
        return view["status"] in ("finished", "failed", "rejected")

    wait_for(ended, 120, "the job to end", interval=0.2)
    assert view["status"] == "finished", view
    with Redis.from_url(url) as client:
        assert client.exists(f"rq:job:{view['id']}") == 1


def test_rq_dashboard_reads_the_locked_redis(locked_stack: LockedStack) -> None:
    stack = locked_stack
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    workers = requests.get(f"{stack.base}/admin/rq/0/data/workers.json", headers=admin, timeout=10)
    assert workers.status_code == 200, workers.text
    assert {q for w in workers.json()["workers"] for q in w["queues"]} >= {"gpu-single", "gpu-multi"}
    page = requests.get(f"{stack.base}/admin/rq/", headers=admin, timeout=10)
    assert page.status_code == 200
    password = (stack.data / "redis" / "password").read_text().strip()
    assert password not in page.text


def test_keys_cli_works_with_the_kept_url(locked_stack: LockedStack) -> None:
    stack = locked_stack
    env = process_env(GPTOSS_REDIS_URL=stack.redis_url())
    done = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--tenant", "acme"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    listed = requests.get(f"{stack.base}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert listed.status_code == 200, listed.text


def test_no_output_shows_the_password(locked_stack: LockedStack) -> None:
    stack = locked_stack
    password = (stack.data / "redis" / "password").read_text().strip()
    stack.up.send_signal(signal.SIGINT)
    assert stack.up.wait(60) == 0
    output = stack.log.read_text()
    assert f"redis://:***@127.0.0.1:{port_of(stack.redis_url())}/0" in output  # the banner, masked
    assert password not in output
