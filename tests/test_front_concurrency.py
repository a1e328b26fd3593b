"""The API process under clients that hold their connections: streams, waiting completions and slow
request heads cost a greenlet each, never the whole API (the 17-connection freeze of the thread
worker); every stream is read through one reader per process; each tenant's open streams are capped;
slow heads are cut; errors gunicorn answers itself are JSON."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import psutil
import pytest
import requests
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.apikeys import create_key
from shared.jobstore.hub import StreamHub
from tests.conftest import Processes, process_env, wait_for

JOB = {"messages": [{"role": "user", "content": "Wait for me."}], "max_tokens": 2, "temperature": 0}


class Api:
    """An API process as `gptoss up` starts it (no scheduler, no worker: every job waits)."""

    def __init__(self, port: int, child: object, redis_port: int):
        self.port, self.child, self.redis_port = port, child, redis_port
        self.base = f"http://127.0.0.1:{port}"
        self.held: list[socket.socket] = []

    def hold(self, request: bytes) -> socket.socket:
        """Open a connection, send `request` (whole or not), and keep it open without reading."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(request)
        self.held.append(sock)
        return sock

    def submit(self, key: str | None = None) -> str:
        answer = requests.post(f"{self.base}/v1/jobs", json=JOB, headers=auth(key), timeout=30)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    def redis_connections(self) -> int:
        root = psutil.Process(self.child.pid)  # type: ignore[attr-defined]
        tree = [root, *root.children(recursive=True)]
        return sum(
            1
            for p in tree
            for c in p.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == self.redis_port
        )


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def raw(method: str, path: str, key: str | None = None, body: dict | None = None, end: bool = True) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + ("\r\n" if end else "")).encode() + (data if end else b"")


def status_of(sock: socket.socket) -> int:
    """The status code of the answer on `sock` (waits for its first line)."""
    line = b""
    while not line.endswith(b"\r\n"):
        got = sock.recv(1)
        assert got, "the API closed the connection without an answer"
        line += got
    return int(line.split()[1])


@pytest.fixture
def start_api(
    redis_url: str, prepared_models, processes: Processes, tmp_path: Path
) -> Iterator[Callable[..., Api]]:
    apis: list[Api] = []

    def start(**settings: object) -> Api:
        port = free_port()
        env = process_env(
            GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
            GPTOSS_MODEL="smollm2-135m", **settings,
        )  # fmt: skip
        child = processes.start(f"api-{port}", ["api"], env)
        api = Api(port, child, int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        wait_for(lambda: _answers(api.base), 120, "the API to answer")
        apis.append(api)
        return api

    yield start
    for api in apis:
        for sock in api.held:
            sock.close()


def _answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_held_connections_do_not_freeze_the_api(start_api: Callable[..., Api]) -> None:
    """Far more held connections than the thread worker had threads: streams, a waiting completion
    and unfinished request heads; /healthz and submissions still answer, and the streams share the
    process's few Redis connections."""
    api = start_api(GPTOSS_API_THREADS=2, GPTOSS_API_ACTIVE_REQUESTS=2)  # streams and waits hold no slot
    streams = 40
    for job_id in [api.submit() for _ in range(streams)]:
        assert status_of(api.hold(raw("GET", f"/v1/jobs/{job_id}/events"))) == 200
    api.hold(raw("POST", "/v1/chat/completions", body=JOB))
    for _ in range(10):
        api.hold(raw("GET", "/healthz", end=False))
    assert requests.get(f"{api.base}/healthz", timeout=30).status_code == 200
    api.submit()
    assert api.redis_connections() < streams  # one reader for every stream, not a connection each


def test_the_thread_worker_freezes_where_gevent_does_not(start_api: Callable[..., Api]) -> None:
    """The finding, in small: as many unfinished heads as threads, and the thread worker answers no
    one else (the control that shows the test above can fail)."""
    api = start_api(GPTOSS_API_WORKER_CLASS="gthread", GPTOSS_API_THREADS=2)
    for _ in range(3):
        api.hold(raw("GET", "/healthz", end=False))
    with pytest.raises(requests.Timeout):
        requests.get(f"{api.base}/healthz", timeout=3)


def test_a_slow_request_head_is_cut(start_api: Callable[..., Api]) -> None:
    api = start_api(GPTOSS_API_HEAD_TIMEOUT=1)
    sock = api.hold(raw("GET", "/healthz", end=False))
    assert sock.recv(1024) == b""  # the API closed it (the socket's own timeout would raise instead)


def test_each_tenant_s_open_streams_are_capped(start_api: Callable[..., Api], redis: Redis) -> None:
    api = start_api(GPTOSS_AUTH="true", GPTOSS_API_STREAMS_PER_TENANT=2)
    mine, theirs = create_key(redis, "capped")[0], create_key(redis, "other")[0]
    jobs = [api.submit(mine) for _ in range(3)]
    first = api.hold(raw("GET", f"/v1/jobs/{jobs[0]}/events", mine))
    assert status_of(first) == 200
    assert status_of(api.hold(raw("GET", f"/v1/jobs/{jobs[1]}/events", mine))) == 200
    refused = requests.get(f"{api.base}/v1/jobs/{jobs[2]}/events", headers=auth(mine), timeout=30)
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "too_many_streams"
    waiting = requests.post(f"{api.base}/v1/chat/completions", json=JOB, headers=auth(mine), timeout=30)
    assert waiting.status_code == 429  # a synchronous completion holds a stream too, and creates no job
    other_job = api.submit(theirs)
    assert status_of(api.hold(raw("GET", f"/v1/jobs/{other_job}/events", theirs))) == 200
    first.close()  # the API notices at its next keep-alive, and the slot is free again

    def reopened() -> bool:
        got = requests.get(
            f"{api.base}/v1/jobs/{jobs[2]}/events", headers=auth(mine), timeout=30, stream=True
        )
        got.close()
        return got.status_code == 200

    wait_for(reopened, 30, "the closed stream's slot to be given back")


def test_errors_gunicorn_answers_are_json(start_api: Callable[..., Api]) -> None:
    api = start_api()
    long_line = requests.get(f"{api.base}/{'a' * 9000}", timeout=30)
    assert long_line.status_code == 414 and long_line.json()["error"]["code"] == "uri_too_long"
    big_headers = requests.get(f"{api.base}/healthz", headers={"X-Big": "b" * 9000}, timeout=30)
    assert big_headers.status_code == 431 and big_headers.json()["error"]["code"] == "headers_too_large"
    many = requests.get(f"{api.base}/healthz", headers={f"X-{i}": "1" for i in range(120)}, timeout=30)
    assert many.status_code == 431 and many.headers["Content-Type"] == "application/json"
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b'"bad_request"' in answer
    sock.close()


def test_the_hub_reads_many_streams_in_order(redis: Redis) -> None:
    """One reader for many followers: each gets its stream's entries after its cursor, in order,
    whether or not it was waiting when they arrived."""
    hub = StreamHub(redis, block_ms=50)
    with closing(hub):
        follow_many(hub, redis)
    assert hub.open == 0


def follow_many(hub: StreamHub, redis: Redis) -> None:
    names = [f"hub-{i}" for i in range(30)]
    with_subscriptions = [hub.subscribe(keys.job_stream(name), "0-0") for name in names]
    subscriptions = [s.__enter__() for s in with_subscriptions]
    for round_ in range(3):
        for name in names:
            redis.xadd(keys.job_stream(name), {"event": "token", "data": str(round_)})
    got: dict[str, list[bytes]] = {name: [] for name in names}

    def read_all() -> bool:
        for name, subscription in zip(names, subscriptions, strict=True):
            got[name] += [fields[b"data"] for _, fields in subscription.take(0.01)]
        return all(len(v) == 3 for v in got.values())

    wait_for(read_all, 30, "every follower to get its three entries")
    assert all(v == [b"0", b"1", b"2"] for v in got.values())
    for s in with_subscriptions:
        s.__exit__(None, None, None)


def test_a_late_follower_of_the_hub_starts_after_its_cursor(redis: Redis) -> None:
    hub = StreamHub(redis, block_ms=50)
    key = keys.job_stream("late")
    first = redis.xadd(key, {"event": "start", "data": "{}"})
    redis.xadd(key, {"event": "token", "data": "{}"})
    arrived = threading.Event()
    with closing(hub), hub.subscribe(key, first.decode()) as subscription:
        entries: list = []

        def take() -> None:
            entries.extend(subscription.take(30))
            arrived.set()

        threading.Thread(target=take).start()
        assert arrived.wait(30)
    assert [fields[b"event"] for _, fields in entries] == [b"token"]
