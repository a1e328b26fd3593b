"""The API's front door against Redis: each request's Redis budget (503 + Retry-After from a stalled
Redis, never a hang; `/healthz` untouched), a submission whose client has gone creates nothing, and
sampling parameters that cannot work are 422s."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from redis import Redis

from api import create_app
from cli.up import free_port
from shared import keys
from shared.apikeys import create_key
from shared.connection import (
    SHORTEST_WAIT,
    BudgetSpent,
    RedisBudget,
    close_budget,
    connect,
    open_budget,
    waits_by_design,
)
from shared.settings import Settings
from tests.conftest import FakeClock, Processes, process_env, wait_for

BUDGET = float(Settings.model_fields["api_redis_budget"].default)
"""The API's default Redis budget per request."""

CLIENT_TIMEOUT = BUDGET + 3
"""A client's patience: past the budget with room to spare, far below the old 5 s x 4 tries."""

PROMPT = {"prompt": "Hello", "max_tokens": 2}


# --- a redis-server of the test's own, which the test can stall ------------------------------------


@dataclass
class StallableRedis:
    """A redis-server the test started; `stall()` freezes it (SIGSTOP), as a hung host would."""

    url: str
    process: subprocess.Popen

    def stall(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)
        wait_for(lambda: self._state() == "T", 10, "redis-server to stop")

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
        wait_for(lambda: self._state() != "T", 10, "redis-server to resume")

    def _state(self) -> str:
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture
def stallable_redis(tmp_path: Path) -> Iterator[StallableRedis]:
    """A redis-server on a free port, apart from the session's, resumed and stopped at teardown."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server must be on PATH (.ci/run installs it)"
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    server = StallableRedis(f"redis://127.0.0.1:{port}/0", process)
    probe = Redis.from_url(server.url, socket_timeout=1)

    def answers() -> bool:
        try:
            return bool(probe.ping())
        except Exception:
            return False

    try:
        wait_for(answers, 10, "the test's redis-server")
        yield server
    finally:
        probe.close()
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(10)


# --- the budget, as plain data ---------------------------------------------------------------------


def test_a_budget_charges_nested_waits_once_and_blocking_reads_not_at_all(clock: FakeClock) -> None:
    budget = RedisBudget(2.0, clock)
    with budget.spending():  # a command
        clock.advance(0.5)
        with budget.spending():  # its reconnect, inside it
            clock.advance(0.25)
        assert budget.left() == pytest.approx(1.25)
        with budget.waiving():  # a blocking read waits by design
            clock.advance(30)
        clock.advance(0.25)
    assert budget.left() == pytest.approx(1.0)
    assert budget.cap(5.0) == pytest.approx(1.0)
    assert budget.cap(None) == pytest.approx(1.0)
    assert budget.cap(0.2) == pytest.approx(0.2)
    budget.check()
    with budget.spending():
        clock.advance(1.5)
    with pytest.raises(BudgetSpent):
        budget.check()
    assert budget.cap(5.0) == SHORTEST_WAIT  # a wait already under way ends on its own timeout


@pytest.mark.parametrize(
    "args, waits",
    [
        (("XREAD", b"BLOCK", "1000", b"STREAMS", "gptoss:events:a", "0-0"), True),
        (("XREAD", b"COUNT", "10", b"BLOCK", "0", b"STREAMS", "s", "0-0"), True),
        (("XREAD", b"STREAMS", "BLOCK", "0-0"), False),  # a stream named BLOCK is not the option
        (("XREADGROUP", b"GROUP", "g", "c", b"BLOCK", "5", b"STREAMS", "s", ">"), True),
        (("BLMOVE", "a", "b", "LEFT", "RIGHT", 5), True),
        (("BLPOP", "a", 1), True),
        (("GET", "a"), False),
        (("SET", "a", b"\xff\xfe not text"), False),
        ((), False),
    ],
)
def test_commands_that_wait_by_design(args: tuple[Any, ...], waits: bool) -> None:
    assert waits_by_design(args) is waits


# --- a budgeted client against a real Redis --------------------------------------------------------


def test_a_budgeted_client_gives_up_on_a_stalled_redis(stallable_redis: StallableRedis) -> None:
    client = connect(stallable_redis.url, budgeted=True)
    client.set("k", "v")  # a pooled connection, as a busy API has
    stallable_redis.stall()
    open_budget(0.5)
    try:
        with pytest.raises(BudgetSpent):
            client.get("k")
        with pytest.raises(BudgetSpent):  # spent: the next command does not even try
            client.hgetall("h")
    finally:
        close_budget()
    stallable_redis.resume()
    assert client.get("k") == b"v"  # no budget open: an ordinary client again


def test_a_blocking_read_waits_outside_the_budget(redis_url: str) -> None:
    client = connect(redis_url, budgeted=True)
    open_budget(0.5)
    try:
        client.xread({"gptoss:test:nothing": "0-0"}, block=1000)  # longer than the budget
        assert client.ping()  # the budget is not spent by the wait
    finally:
        close_budget()


def test_a_blocking_client_cannot_be_budgeted(redis_url: str) -> None:
    with pytest.raises(ValueError):
        connect(redis_url, blocking=True, budgeted=True)


# --- the API with a stalled Redis, as a user runs it ------------------------------------------------


@pytest.mark.parametrize("auth", [True, False], ids=["auth", "no-auth"])
def test_a_stalled_redis_answers_503_within_the_budget(
    stallable_redis: StallableRedis, processes: Processes, tmp_path: Path, auth: bool
) -> None:
    headers = {}
    if auth:
        key, _ = create_key(Redis.from_url(stallable_redis.url), "acme")
        headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = process_env(
        GPTOSS_REDIS_URL=stallable_redis.url, GPTOSS_API_PORT=port, GPTOSS_CACHE_DIR=tmp_path,
        GPTOSS_AUTH=str(auth).lower(),
    )  # fmt: skip
    processes.start("api", ["api"], env)
    wait_for(lambda: _answers(f"{base}/healthz"), 60, "the API to serve")
    submitted = requests.post(f"{base}/v1/jobs", json=PROMPT, headers=headers, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job = f"{base}/v1/jobs/{submitted.json()['id']}"

    stallable_redis.stall()
    for method, url in (("POST", f"{base}/v1/jobs"), ("GET", job)):
        # The old client waited 5 s x 4 tries per command: this timeout would cut it.
        answer = requests.request(method, url, json=PROMPT, headers=headers, timeout=CLIENT_TIMEOUT)
        assert answer.status_code == 503, (method, answer.text)
        assert answer.headers["Retry-After"]
        assert answer.json()["error"]["code"] == "service_unavailable"
    health = requests.get(f"{base}/healthz", timeout=CLIENT_TIMEOUT)
    assert health.status_code == 200

    stallable_redis.resume()
    wait_for(lambda: _answers(job, headers), 30, "the job to be readable again")
    again = requests.post(f"{base}/v1/jobs", json=PROMPT, headers=headers, timeout=30)
    assert again.status_code == 202, again.text


def _answers(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=CLIENT_TIMEOUT).status_code == 200
    except requests.RequestException:
        return False


# --- a submission whose client has gone ------------------------------------------------------------


@pytest.fixture
def post_from(redis: Redis, settings: Callable[..., Settings]) -> Callable[..., Any]:
    """POST /v1/jobs over a real socket whose peer is still there (`hung_up=False`) or closed."""
    client = create_app(settings(), redis).test_client()

    def post(hung_up: bool, headers: dict[str, str] | None = None) -> Any:
        ours, theirs = socket.socketpair()
        if hung_up:
            theirs.close()
        try:
            return client.post(
                "/v1/jobs", json=PROMPT, headers=headers or {}, environ_overrides={"werkzeug.socket": ours}
            )
        finally:
            ours.close()
            theirs.close()

    return post


def _job_keys(redis: Redis) -> list[bytes]:
    """Every key but the rate limiter's (a refused request still counts against the tenant)."""
    return [k for k in redis.keys("*") if not k.decode().startswith(keys.RATE_LIMIT_PREFIX)]


def test_a_submission_whose_client_has_gone_creates_nothing(
    post_from: Callable[..., Any], redis: Redis
) -> None:
    answer = post_from(hung_up=True)
    assert answer.status_code == 499
    assert answer.get_json()["error"]["code"] == "client_closed_request"
    assert _job_keys(redis) == []

    kept = post_from(hung_up=False)
    assert kept.status_code == 202, kept.get_json()
    assert redis.exists(f"rq:job:{kept.get_json()['id']}")


def test_an_abandoned_submission_leaves_its_idempotency_key_free(
    post_from: Callable[..., Any], redis: Redis
) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    assert post_from(hung_up=True, headers=headers).status_code == 499
    retried = post_from(hung_up=False, headers=headers)
    assert retried.status_code == 202, retried.get_json()
    assert "Idempotent-Replayed" not in retried.headers


# --- parameters that cannot work -------------------------------------------------------------------


@pytest.fixture
def client(redis: Redis, settings: Callable[..., Settings]) -> Any:
    return create_app(settings(), redis).test_client()


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 1e-45), ("temperature", 0.005), ("top_p", 1e-46), ("top_p", 0.0)],
)
def test_sampling_parameters_that_cannot_work_are_422(
    client: Any, redis: Redis, field: str, value: float
) -> None:
    answer = client.post("/v1/jobs", json={**PROMPT, field: value})
    assert answer.status_code == 422
    error = answer.get_json()["error"]
    assert error["code"] == "validation_error"
    assert [d["loc"] for d in error["details"]] == [[field]]
    assert _job_keys(redis) == []

    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: value}
    openai = client.post("/v1/chat/completions", json=chat)
    assert openai.status_code == 422
    assert field in str(openai.get_json()["error"])  # the message or the details name it


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.01, "top_p": 1e-6}])
def test_the_floors_themselves_are_accepted(client: Any, sampling: dict[str, float]) -> None:
    answer = client.post("/v1/jobs", json={**PROMPT, **sampling})
    assert answer.status_code == 202, answer.get_json()
