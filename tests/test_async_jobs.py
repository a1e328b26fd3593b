"""The async job API on a real Redis with the real scheduler and burst workers in this process (tiny
gpt-oss): priority, deadlines, Idempotency-Key, webhooks (signed, retried, verified with the
`standardwebhooks` package), retention (410) and listing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from redis import Redis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from scheduler.loop import Scheduler
from scheduler.tokens import PromptCounter
from shared import keys
from shared.errors import ValidationFailed
from shared.webhooks import WebhookSender, check_target, sign, signing_key
from tests.conftest import schedule_all, wait_for
from workers import context
from workers.tiny_model import CONVERSATIONS
from workers.worker import build_worker

SECRET = "whsec_" + "c2VjcmV0LWtleS1vZi10aGUtdGVzdHMtMzItYnl0ZXM="
QUESTION, ANALYSIS, FINAL = CONVERSATIONS[0]
BODY = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 80, "temperature": 0}


@pytest.fixture
def stack(redis: Redis, settings, runtime, clock):  # type: ignore[no-untyped-def]
    from api import create_app
    from shared.heartbeat import WorkerBeat, publish

    config = settings(
        model="tiny-gpt-oss", observability=False, webhook_secret=SECRET, webhook_allow_private=True,
        webhook_backoff=0.05, result_ttl=3600, max_batch_size=1,
    )  # fmt: skip
    for queue in keys.WORKER_QUEUES:
        beat = WorkerBeat(name=f"test-{queue}", queue=queue, model="tiny-gpt-oss", device="cpu", state="idle",
                          pid=1, host="test", at=time.time())  # fmt: skip
        publish(redis, keys.worker_heartbeat(beat.name), beat, 600)
    app = create_app(config, redis).test_client()
    return (
        config,
        app,
        Scheduler(config, redis, PromptCounter(config.cache_dir, config.vocab_dir()), clock=clock),
    )


def work(config, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    """Run a burst worker on gpu-single (one job at a time) until its queues are empty."""
    worker, _ = build_worker(config, redis, runtime.device)
    context.bind(runtime, worker.name, keys.SINGLE_QUEUE, webhooks=WebhookSender(config, redis))
    worker.activity = "idle"
    worker.work(burst=True, logging_level=None)


def test_priority_order_under_a_busy_worker(stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    ids = {}
    for priority in ("low", "normal", "high", "low", "high"):  # all wait while the worker is busy
        body = {**BODY, "max_tokens": 4, "priority": priority}
        ids.setdefault(priority, []).append(app.post("/v1/jobs", json=body).get_json()["id"])
    assert redis.llen("rq:queue:incoming:high") == 2 and redis.llen("rq:queue:incoming:low") == 2
    schedule_all(scheduler, redis)
    assert redis.llen(f"rq:queue:{keys.SINGLE_QUEUE}:high") == 2
    work(config, redis, runtime)
    started = {
        job_id: app.get(f"/v1/jobs/{job_id}").get_json()["timestamps"]["started"]
        for job_id in ids["high"] + ids["normal"] + ids["low"]
    }
    assert sorted(started, key=started.__getitem__) == ids["high"] + ids["normal"] + ids["low"]
    view = app.get(f"/v1/jobs/{ids['high'][0]}").get_json()
    assert view["priority"] == "high" and view["status"] == "finished"


def test_scheduler_takes_higher_priority_incoming_first(stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    low = app.post("/v1/jobs", json={**BODY, "priority": "low"}).get_json()["id"]
    high = app.post("/v1/jobs", json={**BODY, "priority": "high"}).get_json()["id"]
    from shared.jobstore.intake import Intake

    intake = Intake(redis)
    assert [intake.take(0.1).id, intake.take(0.1).id] == [high, low]  # type: ignore[union-attr]


def test_deadline_expiry(stack, redis: Redis, runtime, clock) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    late = app.post("/v1/jobs", json={**BODY, "cancel_after": 0.001}).get_json()["id"]
    past = app.post("/v1/jobs", json={**BODY, "deadline": "2020-01-01T00:00:00Z"}).get_json()["id"]
    fine = app.post("/v1/jobs", json={**BODY, "cancel_after": 3600}).get_json()["id"]
    clock.now = time.time() + 0.01  # past `late`'s start deadline when the scheduler looks
    schedule_all(scheduler, redis)
    for job_id in (late, past):
        view = app.get(f"/v1/jobs/{job_id}").get_json()
        assert view["status"] == "expired" and view["error"]["code"] == "deadline_exceeded", view
        assert "deadline" in view["error"]["message"]
    assert app.get(f"/v1/jobs/{fine}").get_json()["status"] == "scheduled"
    # A job already routed when its deadline passes: the worker refuses to start it.
    redis.delete(keys.worker_heartbeat("test-gpu-multi"))
    tight = app.post("/v1/jobs", json={**BODY, "cancel_after": 0.5}).get_json()["id"]
    schedule_all(scheduler, redis)
    wait_for(lambda: time.time() > app.get(f"/v1/jobs/{tight}").get_json()["deadline"], 5, "the deadline")
    work(config, redis, runtime)
    assert app.get(f"/v1/jobs/{fine}").get_json()["status"] == "finished"
    view = app.get(f"/v1/jobs/{tight}").get_json()
    assert view["status"] == "expired" and "started" not in view["timestamps"]


def test_idempotency_key(stack) -> None:  # type: ignore[no-untyped-def]
    _, app, _ = stack
    headers = {"Idempotency-Key": "order-42"}
    first = app.post("/v1/jobs", json=BODY, headers=headers)
    again = app.post("/v1/jobs", json=dict(reversed(list(BODY.items()))), headers=headers)  # same body
    assert first.status_code == 202 and again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = app.post("/v1/jobs", json={**BODY, "max_tokens": 5}, headers=headers)
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "idempotency_key_reused"
    assert (
        app.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "new"}).get_json()["id"]
        != first.get_json()["id"]
    )


class Receiver:
    """An HTTP server of the test that records webhook deliveries; the first answer can be a 500."""

    def __init__(self, fail_first: int = 0):
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                failing = len(receiver.deliveries) <= receiver.fail_first
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.server.shutdown()


def test_webhook_delivered_signed_and_retried(stack, redis: Redis, runtime, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = stack
    job_id = app.post("/v1/jobs", json={**BODY, "webhook": receiver.url}).get_json()["id"]
    schedule_all(scheduler, redis)
    work(config, redis, runtime)
    wait_for(lambda: len(receiver.deliveries) >= 2, 30, "the retried delivery")
    (first_headers, first_body), (headers, body) = receiver.deliveries[:2]
    assert first_headers["webhook-id"] == headers["webhook-id"]  # a retry is the same message
    payload = Webhook(SECRET).verify(body, headers)  # the Standard Webhooks reference verifier
    assert payload["type"] == "job.finished" and payload["data"]["id"] == job_id
    assert payload["data"]["result"]["text"] == FINAL
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"finished", b"failed!!"), headers)  # tampered: refused
    # Our own signing agrees with the spec: HMAC-SHA256 over "id.timestamp.body".
    expected = sign(signing_key(SECRET), headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    assert headers["webhook-signature"] == expected
    # The message was in the outbox from the job's ending until its delivery.
    wait_for(lambda: redis.hlen(keys.WEBHOOK_OUTBOX) == 0, 30, "the delivered message out of the outbox")


def test_webhook_on_cancel_and_private_targets_refused(
    stack, redis: Redis, receiver: Receiver, settings
) -> None:  # type: ignore[no-untyped-def]
    _, app, _ = stack
    receiver.fail_first = 0
    job_id = app.post("/v1/jobs", json={**BODY, "webhook": receiver.url}).get_json()["id"]
    assert app.delete(f"/v1/jobs/{job_id}").status_code == 200
    wait_for(lambda: len(receiver.deliveries) >= 1, 30, "the delivery")
    assert json.loads(receiver.deliveries[0][1])["type"] == "job.cancelled"
    # Without the setting, loopback, private and link-local targets are refused at submission.
    from api import create_app

    strict = create_app(settings(model="tiny-gpt-oss", webhook_secret=SECRET), redis).test_client()
    for url in (
        "http://127.0.0.1:9/x",
        "http://10.0.0.8/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
    ):
        response = strict.post("/v1/jobs", json={**BODY, "webhook": url})
        assert response.status_code == 422, url
    with pytest.raises(ValidationFailed):
        check_target("ftp://example.com/x", allow_private=True)
    off = create_app(settings(model="tiny-gpt-oss"), redis).test_client()  # no secret: webhooks off
    assert off.post("/v1/jobs", json={**BODY, "webhook": "https://example.com/x"}).status_code == 422


def test_retention_expiry_answers_410(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    from api import create_app

    app = create_app(settings(model="tiny-gpt-oss", result_ttl=1), redis).test_client()
    job_id = app.post("/v1/jobs", json=BODY).get_json()["id"]
    assert app.delete(f"/v1/jobs/{job_id}").status_code == 200  # ended: now kept for result_ttl only
    wait_for(lambda: app.get(f"/v1/jobs/{job_id}").status_code == 410, 10, "the job to expire")
    response = app.get(f"/v1/jobs/{job_id}")
    assert response.get_json()["error"]["code"] == "job_expired"
    assert app.get(f"/v1/jobs/{job_id}/events").status_code == 410
    assert app.get("/v1/jobs/neverexisted").status_code == 404


def test_list_jobs_with_paging(stack) -> None:  # type: ignore[no-untyped-def]
    _, app, _ = stack
    ids = [app.post("/v1/jobs", json=BODY).get_json()["id"] for _ in range(5)]
    page = app.get("/v1/jobs?limit=2").get_json()
    assert page["object"] == "list" and [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = app.get(f"/v1/jobs?limit=10&after={page['last_id']}").get_json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    assert app.get("/v1/jobs?limit=0").status_code == 422


def test_a_webhook_whose_sender_died_is_delivered_again_under_its_id(
    redis: Redis, settings, receiver: Receiver
) -> None:  # type: ignore[no-untyped-def]
    """The worker writes the job's webhook message with its ending, then dies before sending it: the
    scheduler's sweep finds it in the outbox and sends it, under the same id, until it is accepted."""
    from shared.contract import JobStatus, JobView, StageTimes

    config = settings(webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff=0.05)
    view = JobView(
        id="job-1", status=JobStatus.FINISHED, model="m", timestamps=StageTimes(), url="/v1/jobs/job-1"
    )
    message_id, value = WebhookSender(config, redis).entry(receiver.url, view, at=time.time())
    redis.hset(keys.WEBHOOK_OUTBOX, message_id, value)  # the settling wrote it; its worker is gone
    sweeping = WebhookSender(config, redis)
    assert sweeping.redeliver() == 0  # not yet: its own sender may still be trying
    assert sweeping.redeliver(now=time.time() + keys.WEBHOOK_REDELIVER_AFTER + 1) == 1
    wait_for(lambda: redis.hlen(keys.WEBHOOK_OUTBOX) == 0, 30, "the message delivered and out of the outbox")
    assert [h["webhook-id"] for h, _ in receiver.deliveries] == [message_id, message_id]  # a 500, then 204
    assert (
        Webhook(SECRET).verify(receiver.deliveries[-1][1], receiver.deliveries[-1][0])["data"]["id"]
        == "job-1"
    )
    assert sweeping.redeliver(now=time.time() + 10 * keys.WEBHOOK_REDELIVER_AFTER) == 0
