"""Webhooks cannot be aimed inside or starve another tenant: only public addresses, the connection
goes to the address that was checked (DNS rebinding), and each tenant waits in its own queue (one
tenant's failing or hanging receivers do not delay another's deliveries). Real Redis, real HTTP
receivers on the loopback; the order of events is asserted, never their timing."""

from __future__ import annotations

import ipaddress
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3
from redis import Redis

from cli.up import free_port
from shared import keys
from shared.contract import JobStatus, JobView, StageTimes
from shared.errors import ValidationFailed
from shared.settings import Settings
from shared.webhook_delivery import FairDispatcher, Message, Outcome, backoff
from shared.webhook_targets import Target, is_public, post, resolve_target
from shared.webhooks import WebhookSender
from tests.conftest import wait_for

SECRET = "whsec_" + "c2VjcmV0LWtleS1vZi10aGUtdGVzdHMtMzItYnl0ZXM="

REFUSED = [
    "127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1",
    "192.0.0.8", "224.0.0.1", "255.255.255.255", "::1", "fe80::1", "fc00::1", "ff02::1", "2001:db8::1",
    "fec0::1",  # site-local (deprecated)
    "2002:a00:1::",  # 6to4 of 10.0.0.1
    "2002:6440:1::",  # 6to4 of 100.64.0.1 (CGNAT)
    "::ffff:10.0.0.1",  # IPv4-mapped
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::808:808",  # local-use NAT64
    "::10.0.0.1",  # IPv4-compatible (deprecated)
]  # fmt: skip
PUBLIC = ["8.8.8.8", "2606:4700::1111", "2002:808:808::1", "64:ff9b::808:808", "::ffff:8.8.8.8"]


def view(job_id: str) -> JobView:
    return JobView(
        id=job_id, status=JobStatus.FINISHED, model="m", timestamps=StageTimes(), url=f"/v1/jobs/{job_id}"
    )


class Receiver:
    """An HTTP server on the loopback that records each POST; `hold` makes it hang (until released)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, hold: bool = False, tls: ssl.SSLContext | None = None
    ):
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.on_arrival: Callable[[dict[str, str]], None] = lambda headers: None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.on_arrival(headers)
                with receiver.arrived:
                    receiver.deliveries.append((headers, body))
                    receiver.arrived.notify_all()
                receiver.release.wait()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{host}:{self.port}/hook"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(**kwargs: object) -> Receiver:
        started.append(Receiver(**kwargs))  # type: ignore[arg-type]
        return started[-1]

    yield make
    for receiver in started:
        receiver.stop()


@pytest.fixture
def senders() -> Iterator[Callable[..., WebhookSender]]:
    made: list[WebhookSender] = []

    def make(*args: object, **kwargs: object) -> WebhookSender:
        made.append(WebhookSender(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for sender in made:
        sender.close(wait=False)


def fixed(*answers: str) -> Callable[[str, int], list[str]]:
    return lambda host, port: list(answers)


@pytest.mark.parametrize("address", REFUSED)
def test_non_global_addresses_are_refused(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(ValidationFailed):
        resolve_target("https://hook.example/x", False, fixed(address))
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(ValidationFailed):
        resolve_target(f"http://{literal}/x", False, fixed("8.8.8.8"))  # an address in the URL


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_pinned(address: str) -> None:
    target = resolve_target("https://user:pw@hook.example:8443/x?y=1", False, fixed(address, "8.8.4.4"))
    pinned = ipaddress.ip_address(address)
    if isinstance(pinned, ipaddress.IPv6Address) and pinned.ipv4_mapped is not None:
        pinned = pinned.ipv4_mapped  # reached over IPv4
    assert ipaddress.ip_address(target.address) == pinned
    assert target.host == "hook.example" and target.port == 8443
    assert target.host_header == "hook.example:8443" and target.path == "/x?y=1"
    assert target.authorization is not None
    with pytest.raises(ValidationFailed):  # one internal address among the answers is enough
        resolve_target("https://hook.example/x", False, fixed(address, "10.0.0.1"))
    # The setting for tests and local use lets them through.
    assert resolve_target("http://hook.example/x", True, fixed("10.0.0.1")).address == "10.0.0.1"


def test_the_connection_goes_to_the_checked_address(
    redis: Redis,
    settings: Callable[..., Settings],
    receivers: Callable[..., Receiver],
    senders: Callable[..., WebhookSender],
) -> None:
    """DNS rebinding: the name is resolved once per attempt and the connection goes to that answer;
    a resolver that answers another address the second time is never reached there."""
    good = receivers(host="127.0.0.1")
    trap = receivers(host="127.0.0.2", port=good.port)  # what a second lookup would reach
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else ["127.0.0.2"]

    config = settings(webhook_secret=SECRET, webhook_allow_private=True, webhook_attempts=1)
    sender = senders(config, redis, resolver=rebinding)
    future = sender.send(f"http://hook.invalid:{good.port}/hook", view("job-1"), "acme")
    assert future is not None and future.result(timeout=30) is True
    assert lookups == ["hook.invalid"]
    assert len(good.deliveries) == 1 and trap.deliveries == []
    assert good.deliveries[0][0]["host"] == f"hook.invalid:{good.port}"
    assert redis.hlen(keys.WEBHOOK_OUTBOX) == 0


def test_a_name_that_now_points_inside_is_given_up(
    redis: Redis, settings: Callable[..., Settings], senders: Callable[..., WebhookSender]
) -> None:
    config = settings(webhook_secret=SECRET, webhook_attempts=3)
    sender = senders(config, redis, resolver=fixed("10.0.0.1"))
    future = sender.send("http://hook.invalid/hook", view("job-1"), "acme")
    assert future is not None and future.result(timeout=30) is False  # refused: no retries, no connection
    assert redis.hlen(keys.WEBHOOK_OUTBOX) == 0


def _certificate(folder: Path, name: str) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test's certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_tls_names_the_host_while_connecting_to_the_pinned_address(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    """Over https the pinned connection sends the URL's host as SNI and checks the certificate
    against it (not against the address)."""
    cert, key = _certificate(tmp_path, "hook.invalid")
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    server = receivers(tls=context)

    def target(host: str) -> Target:
        return Target("https", host, server.port, "127.0.0.1", "/hook", f"{host}:{server.port}")

    assert post(target("hook.invalid"), b"{}", {}, timeout=30, ca_certs=cert) == 204
    assert names == ["hook.invalid"] and server.deliveries[0][0]["host"] == f"hook.invalid:{server.port}"
    with pytest.raises(urllib3.exceptions.SSLError):  # the certificate is not other.invalid's
        post(target("other.invalid"), b"{}", {}, timeout=30, ca_certs=cert)
    with pytest.raises(urllib3.exceptions.SSLError):  # nor trusted by the default CA bundle
        post(target("hook.invalid"), b"{}", {}, timeout=30)
    assert len(server.deliveries) == 1


def test_a_tenant_whose_receiver_hangs_does_not_delay_another(
    redis: Redis,
    settings: Callable[..., Settings],
    receivers: Callable[..., Receiver],
    senders: Callable[..., WebhookSender],
) -> None:
    hanging, prompt = receivers(hold=True), receivers()
    config = settings(webhook_secret=SECRET, webhook_allow_private=True, webhook_timeout=300)
    sender = senders(config, redis)
    a = [sender.send(hanging.url, view(f"a{i}"), "tenant-a") for i in range(12)]
    with hanging.arrived:  # tenant A holds its share of the threads, hanging
        assert hanging.arrived.wait_for(lambda: len(hanging.deliveries) >= 2, timeout=30)
    b = sender.send(prompt.url, view("b0"), "tenant-b")
    assert b is not None and b.result(timeout=30) is True
    assert len(hanging.deliveries) == 2  # at most two of A's under way at once, and none answered
    assert not any(f is not None and f.done() for f in a)
    hanging.release.set()
    assert all(f is not None and f.result(timeout=60) is True for f in a)


def test_a_tenant_whose_receiver_refuses_does_not_delay_another(
    redis: Redis,
    settings: Callable[..., Settings],
    receivers: Callable[..., Receiver],
    senders: Callable[..., WebhookSender],
) -> None:
    """Tenant A's 12 webhooks go to a closed port (connection refused) and back off between attempts;
    tenant B's first webhook, sent after them, arrives while every one of A's is still retrying."""
    closed = f"http://127.0.0.1:{free_port()}/hook"
    prompt = receivers()
    config = settings(
        webhook_secret=SECRET, webhook_allow_private=True, webhook_attempts=5, webhook_backoff=2.0
    )
    sender = senders(config, redis)
    a: list[Future[bool] | None] = [sender.send(closed, view(f"a{i}"), "tenant-a") for i in range(12)]
    seen: dict[str, object] = {}
    prompt.on_arrival = lambda headers: seen.update(
        a_done=sum(f is not None and f.done() for f in a), outbox=redis.hlen(keys.WEBHOOK_OUTBOX)
    )
    b = sender.send(prompt.url, view("b0"), "tenant-b")
    assert b is not None and b.result(timeout=30) is True
    assert seen == {"a_done": 0, "outbox": 13}  # A's all pending (in the outbox), B's not yet delivered
    assert redis.hlen(keys.WEBHOOK_OUTBOX) == 12  # B's delivered and out; A's still there


def test_outbox_entries_carry_the_tenant_and_old_ones_still_deliver(
    redis: Redis,
    settings: Callable[..., Settings],
    receivers: Callable[..., Receiver],
    senders: Callable[..., WebhookSender],
) -> None:
    receiver = receivers()
    config = settings(webhook_secret=SECRET, webhook_allow_private=True)
    sender = senders(config, redis)
    message_id, value = sender.entry(receiver.url, view("job-1"), "acme")
    assert json.loads(value)["tenant"] == "acme"
    assert json.loads(sender.entry(receiver.url, view("job-1"))[1])["tenant"] == keys.DEFAULT_TENANT
    old = {k: v for k, v in json.loads(value).items() if k != "tenant"}  # written before tenants travelled
    redis.hset(keys.WEBHOOK_OUTBOX, message_id, json.dumps({**old, "at": time.time() - 1000}))
    assert sender.redeliver() == 1
    wait_for(lambda: redis.hlen(keys.WEBHOOK_OUTBOX) == 0, 30, "the old entry delivered")
    assert [h["webhook-id"] for h, _ in receiver.deliveries] == [message_id]


class Attempts:
    """An attempt function of the test: records the order; tenant `a`'s wait for `gate`, then answer
    `a_outcome`."""

    def __init__(self, a_outcome: Outcome = "accepted"):
        self.order: list[str] = []
        self.gate = threading.Event()
        self.a_outcome = a_outcome
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = {}
        self.most: dict[str, int] = {}

    def __call__(self, message: Message) -> Outcome:
        with self.lock:
            self.order.append(message.message_id)
            self.in_flight[message.tenant] = self.in_flight.get(message.tenant, 0) + 1
            self.most[message.tenant] = max(self.most.get(message.tenant, 0), self.in_flight[message.tenant])
        if message.tenant == "a":
            self.gate.wait()
        with self.lock:
            self.in_flight[message.tenant] -= 1
        return self.a_outcome if message.tenant == "a" else "accepted"


def test_dispatcher_serves_tenants_in_turn() -> None:
    attempts = Attempts()
    settled: list[str] = []
    dispatcher = FairDispatcher(attempts, lambda m, ok: settled.append(m.message_id), attempts=1,
                                backoff_base=0, threads=1)  # fmt: skip
    futures = [dispatcher.submit(Message(f"a{i}", "u", b"", "a")) for i in range(12)]
    wait_for(lambda: attempts.order == ["a0"], 30, "the first attempt under way")
    futures.append(dispatcher.submit(Message("b0", "u", b"", "b")))
    attempts.gate.set()
    assert all(f.result(timeout=30) for f in futures)
    assert attempts.order.index("b0") <= 2  # one turn of A's at most before B's, not eleven
    assert sorted(settled) == sorted(attempts.order)


def test_dispatcher_caps_a_tenant_and_backs_off_without_holding_threads() -> None:
    attempts = Attempts(a_outcome="failed")
    dispatcher = FairDispatcher(
        attempts, lambda m, ok: None, attempts=3, backoff_base=3600, threads=4, per_tenant=2
    )
    a = [dispatcher.submit(Message(f"a{i}", "u", b"", "a")) for i in range(12)]
    wait_for(lambda: len(attempts.order) == 2, 30, "two of A's under way")
    assert dispatcher.submit(Message("a0", "u", b"", "a")) is a[0]  # the same message is not taken twice
    b = dispatcher.submit(Message("b0", "u", b"", "b"))
    assert b.result(timeout=30) is True and attempts.most["a"] == 2
    attempts.gate.set()  # A's fail and wait an hour each, off the threads: each tried once, in turn
    wait_for(lambda: len(attempts.order) == 13, 30, "every one of A's tried once")
    assert sorted(attempts.order) == sorted([f"a{i}" for i in range(12)] + ["b0"])
    assert dispatcher.submit(Message("b1", "u", b"", "b")).result(timeout=30) is True
    assert not any(f.done() for f in a) and dispatcher.pending() == 12
    dispatcher.close(wait=False)
    assert all(f.cancelled() for f in a)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(1.0, n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(1.0, 20) == 60.0
