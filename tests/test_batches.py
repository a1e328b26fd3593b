"""Files and Batches with the official `openai` client against the API app (over WSGI), the
scheduler and the batch feeder in this process (the feeder's clock in the test's hands) and burst
workers on tiny-gpt-oss: a batch of 50 lines, some invalid, completes; cancelled and expired
batches keep what finished; uploads are refused line by line; quotas; tenants never meet."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletion
from prometheus_client import CollectorRegistry
from redis import Redis

from scheduler.feeder import Feeder
from scheduler.tokens import PromptCounter
from shared import keys
from shared.apikeys import create_key
from shared.batches.ledger import BatchLedger
from shared.batches.metrics import BatchMetrics
from shared.jobstore import rqstore
from shared.settings import Settings
from shared.webhooks import WebhookSender, sign, signing_key
from tests.conftest import TINY, FakeClock, live_test_workers, schedule_all, work

DAY = 24 * 3600


@dataclass
class BatchRig:
    """The API app, a scheduler, a feeder (on the test's clock) and two tenants' clients."""

    config: Settings
    redis: Redis
    runtime: Any
    scheduler: Any
    feeder: Feeder
    clock: FakeClock
    acme: openai.OpenAI
    other: openai.OpenAI
    metrics: BatchMetrics
    most_waiting: int = 0

    def step(self, work_too: bool = True) -> None:
        """One feeder round, then the scheduler places what it released, then (`work_too`) the
        workers run everything waiting."""
        self.feeder.round()
        self.most_waiting = max(self.most_waiting, batch_jobs_waiting(self.redis))
        schedule_all(self.scheduler, self.redis)
        if work_too:
            work(self.config, self.redis, self.runtime, keys.SINGLE_QUEUE)

    def run_until_ended(self, batch_id: str, steps: int = 60) -> Any:
        for _ in range(steps):
            self.step()
            batch = self.acme.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                return batch
        raise AssertionError(f"batch {batch_id} did not end in {steps} rounds: {batch.status}")


def batch_jobs_waiting(redis: Redis) -> int:
    """Batch jobs waiting in any queue now (the bound the feeder keeps)."""
    return sum(int(redis.llen(rqstore.queue_key(q))) for q in keys.BATCH_QUEUES)  # type: ignore[arg-type]


def count(metrics: BatchMetrics, name: str, **labels: str) -> float:
    for metric in metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


def client_of(app: Any, key: str) -> openai.OpenAI:
    transport = httpx2.WSGITransport(app=app)
    http = httpx2.Client(transport=transport, base_url="http://api.test")
    return openai.OpenAI(base_url="http://api.test/v1", api_key=key, max_retries=0, http_client=http)


@pytest.fixture
def rig(
    redis: Redis, settings: Callable[..., Settings], runtime: Any, clock: FakeClock
) -> Iterator[Callable[..., BatchRig]]:
    from api import create_app
    from scheduler.loop import Scheduler

    def make(**overrides: object) -> BatchRig:
        config = settings(model=TINY, observability=False, auth=True, batch_jobs_waiting=4, **overrides)
        app = create_app(config, redis)
        acme_key, _ = create_key(redis, "acme")
        other_key, _ = create_key(redis, "globex")
        live_test_workers(redis)
        counter = PromptCounter(config.cache_dir, config.vocab_dir())
        sender = WebhookSender(config, redis)
        senders.append(sender)
        metrics = BatchMetrics(CollectorRegistry())
        feeder = Feeder(config, redis, counter, metrics, sender, clock=clock)
        acme, other = client_of(app, acme_key), client_of(app, other_key)
        return BatchRig(
            config, redis, runtime, Scheduler(config, redis, counter), feeder, clock, acme, other, metrics
        )

    senders: list[WebhookSender] = []
    yield make
    for sender in senders:
        sender.close(wait=False)


def chat_line(custom_id: str, topic: str = "the sea", **body: Any) -> dict[str, Any]:
    request = {"model": TINY, "messages": [{"role": "user", "content": f"One sentence about {topic}."}],
               "max_tokens": 4, "temperature": 0, **body}  # fmt: skip
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": request}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> Any:
    return client.files.create(file=("requests.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")


def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


INVALID = {
    "bad-temperature": ({"temperature": 7}, 422, "validation_error"),
    "bad-param": ({"frequency_penalty": 1.5}, 422, "unsupported_parameter"),
    "unknown-model": ({"model": "gpt-4o"}, 404, "model_not_found"),
    "over-max-tokens": ({"max_tokens": 100_000}, 422, "validation_error"),
    "too-long": ({"messages": [{"role": "user", "content": "word " * 5000}]}, 413, "prompt_too_long"),
    "streamed": ({"stream": True}, 422, "unsupported_parameter"),
}
"""Lines the endpoint would refuse: body fields, the status and the code they are refused with."""


def test_a_batch_of_fifty_lines_completes_with_every_line_written_once(rig: Callable[..., BatchRig]) -> None:
    bench = rig()
    topics = ["a cat", "the sea", "a robot", "winter", "bread", "a king", "music", "the moon"]
    valid = [chat_line(f"req-{i}", topics[i % len(topics)]) for i in range(44)]
    invalid = [chat_line(name, **body) for name, (body, _, _) in INVALID.items()]
    lines = valid[:20] + invalid + valid[20:]
    uploaded = upload(bench.acme, lines)
    assert uploaded.purpose == "batch" and uploaded.status == "processed"
    assert uploaded.bytes == len(jsonl(lines)) and uploaded.filename == "requests.jsonl"
    assert bench.acme.files.content(uploaded.id).content == jsonl(lines)  # kept as sent

    batch = bench.acme.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"run": "fifty"},
    )  # fmt: skip
    assert batch.status == "validating" and batch.expires_at == batch.created_at + DAY
    # A second feeder, as a second scheduler would run: each line is still written once.
    counter = PromptCounter(bench.config.cache_dir, bench.config.vocab_dir())
    second = Feeder(bench.config, bench.redis, counter, bench.metrics, clock=bench.clock)
    for _ in range(80):
        bench.step()
        second.round()
        batch = bench.acme.batches.retrieve(batch.id)
        if batch.status == "completed":
            break
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        50,
        44,
        6,
    )
    assert (
        batch.in_progress_at
        and batch.finalizing_at
        and batch.completed_at
        and batch.metadata == {"run": "fifty"}
    )
    assert 0 < bench.most_waiting <= 4  # released as the workers took them, never all at once

    outputs = file_lines(bench.acme, batch.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"req-{i}" for i in range(44))  # once each
    for output in outputs:
        assert output["id"].startswith("batch_req_") and output["error"] is None
        assert output["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(output["response"]["body"])
        job_id = output["response"]["request_id"]
        assert completion.id == f"chatcmpl-{job_id}" and completion.choices[0].message.content is not None
    errors = {e["custom_id"]: e for e in file_lines(bench.acme, batch.error_file_id)}
    assert set(errors) == set(INVALID)
    for name, (_, status, code) in INVALID.items():
        assert errors[name]["response"]["status_code"] == status, name
        assert errors[name]["response"]["body"]["error"]["code"] == code, name
    output_file = bench.acme.files.retrieve(batch.output_file_id)  # type: ignore[arg-type]
    assert output_file.purpose == "batch_output"
    assert output_file.bytes == len(bench.acme.files.content(output_file.id).content)

    finished = {
        o: count(bench.metrics, "gptoss_batch_lines_finished_total", outcome=o)
        for o in ("completed", "refused")
    }
    assert finished == {"completed": 44, "refused": 6}
    assert count(bench.metrics, "gptoss_batch_lines_released_total") == 44
    assert count(bench.metrics, "gptoss_batch_batches_ended_total", status="completed") == 1

    # Each line ran as one job of its own, at batch priority, in the tenant's jobs.
    job = bench.acme.get(f"/jobs/{outputs[0]['response']['request_id']}", cast_to=dict)
    assert job["status"] == "finished" and job["priority"] == "batch"


def test_a_cancelled_batch_releases_nothing_more_and_keeps_what_finished(
    rig: Callable[..., BatchRig],
) -> None:
    bench = rig()
    batch = bench.acme.batches.create(
        input_file_id=upload(bench.acme, [chat_line(f"c-{i}") for i in range(20)]).id,
        endpoint="/v1/chat/completions", completion_window="24h",
    )  # fmt: skip
    bench.step()  # validated, 4 released and run
    bench.step(work_too=False)  # those 4 written, 4 more released, still waiting
    assert bench.acme.batches.retrieve(batch.id).request_counts.completed == 4  # type: ignore[union-attr]
    released = bench.redis.zcard(keys.tenant_jobs("acme"))
    cancelling = bench.acme.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch = bench.run_until_ended(batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert bench.redis.zcard(keys.tenant_jobs("acme")) == released  # no job released after the cancel
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        20,
        4,
        4,
    )
    assert len(file_lines(bench.acme, batch.output_file_id)) == 4
    stopped = file_lines(bench.acme, batch.error_file_id)
    assert [e["error"]["code"] for e in stopped] == ["batch_cancelled"] * 4
    assert bench.acme.batches.cancel(batch.id).status == "cancelled"  # cancelling again: as it is
    done = bench.acme.batches.create(
        input_file_id=upload(bench.acme, [chat_line("only")]).id, endpoint="/v1/chat/completions",
        completion_window="24h",
    )  # fmt: skip
    assert bench.run_until_ended(done.id).status == "completed"
    with pytest.raises(openai.ConflictError):  # a completed batch has nothing to cancel
        bench.acme.batches.cancel(done.id)


def test_an_expired_batch_keeps_its_finished_lines_and_writes_the_rest_as_errors(
    rig: Callable[..., BatchRig],
) -> None:
    bench = rig()
    batch = bench.acme.batches.create(
        input_file_id=upload(bench.acme, [chat_line(f"e-{i}") for i in range(20)]).id,
        endpoint="/v1/chat/completions", completion_window="24h",
    )  # fmt: skip
    bench.step()  # 4 released and run
    bench.step(work_too=False)  # 4 written, 4 more released and waiting
    bench.clock.advance(DAY + 1)  # the completion window is over
    batch = bench.run_until_ended(batch.id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        20,
        4,
        16,
    )
    outputs = file_lines(bench.acme, batch.output_file_id)
    errors = file_lines(bench.acme, batch.error_file_id)
    assert sorted(o["custom_id"] for o in outputs) == [f"e-{i}" for i in range(4)]
    assert sorted(e["custom_id"] for e in errors) == sorted(f"e-{i}" for i in range(4, 20))
    assert {e["error"]["code"] for e in errors} == {"batch_expired"} and all(
        e["response"] is None for e in errors
    )


def test_an_upload_is_refused_with_its_bad_lines_numbered(rig: Callable[..., BatchRig]) -> None:
    bench = rig()
    good = json.dumps(chat_line("a")).encode()
    body = b"\n".join([
        good,
        b"",  # blank lines are skipped, and still counted
        b"{not json",
        json.dumps({**chat_line("b"), "method": "GET"}).encode(),
        good,  # custom_id `a` again
        json.dumps({**chat_line("c"), "url": "/v1/embeddings"}).encode(),
        json.dumps({**chat_line("d"), "body": "text"}).encode(),
    ])  # fmt: skip
    with pytest.raises(openai.BadRequestError) as refused:
        bench.acme.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="batch")
    error: Any = refused.value.body  # the client keeps the `error` object of the answer
    assert error["code"] == "invalid_file"
    assert [(d["line"], d["code"]) for d in error["details"]] == [
        (3, "invalid_json"), (4, "invalid_method"), (5, "duplicate_custom_id"), (6, "invalid_url"),
        (7, "invalid_body"),
    ]  # fmt: skip
    assert bench.acme.files.list().data == []  # nothing kept
    with pytest.raises(openai.UnprocessableEntityError, match="assistants"):
        bench.acme.files.create(file=("a.jsonl", io.BytesIO(good)), purpose="assistants")
    uploaded = bench.acme.files.create(file=("ok.jsonl", io.BytesIO(good)), purpose="batch")
    with pytest.raises(openai.UnprocessableEntityError, match="embeddings"):
        bench.acme.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.UnprocessableEntityError):
        bench.acme.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="48h",  # type: ignore[arg-type]
        )


def test_a_batch_whose_lines_call_another_endpoint_fails_validation(rig: Callable[..., BatchRig]) -> None:
    bench = rig()
    uploaded = upload(bench.acme, [chat_line("a")])
    batch = bench.acme.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    batch = bench.run_until_ended(batch.id)
    assert batch.status == "failed" and batch.failed_at is not None and batch.errors is not None
    assert batch.errors.data is not None and batch.errors.data[0].code == "mismatched_endpoint"


def test_quotas_bound_files_bytes_and_batches(rig: Callable[..., BatchRig]) -> None:
    bench = rig(tenant_files=2, file_max_bytes=2000, tenant_batches=1)
    first = upload(bench.acme, [chat_line("a")])
    upload(bench.acme, [chat_line("b")])
    with pytest.raises(openai.RateLimitError) as full:
        upload(bench.acme, [chat_line("c")])
    assert full.value.response.headers["Retry-After"].isdigit()
    assert full.value.body["code"] == "file_quota_exceeded"  # type: ignore[index]
    upload(bench.other, [chat_line("a")])  # another tenant's quota is its own
    with pytest.raises(openai.APIStatusError) as large:
        upload(bench.other, [chat_line(f"x{i}") for i in range(20)])
    assert large.value.status_code == 413 and large.value.body["code"] == "file_too_large"  # type: ignore[index]
    bench.acme.batches.create(
        input_file_id=first.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.RateLimitError, match="batches at work"):
        bench.acme.batches.create(
            input_file_id=first.id, endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_another_tenants_files_and_batches_are_not_found(rig: Callable[..., BatchRig]) -> None:
    bench = rig()
    uploaded = upload(bench.acme, [chat_line("a")])
    batch = bench.acme.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: bench.other.files.retrieve(uploaded.id),
        lambda: bench.other.files.content(uploaded.id),
        lambda: bench.other.files.delete(uploaded.id),
        lambda: bench.other.batches.retrieve(batch.id),
        lambda: bench.other.batches.cancel(batch.id),
        lambda: bench.other.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bench.other.files.list().data == [] and bench.other.batches.list().data == []
    assert [f.id for f in bench.acme.files.list().data] == [uploaded.id]
    assert [b.id for b in bench.acme.batches.list().data] == [batch.id]
    assert bench.acme.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        bench.acme.files.retrieve(uploaded.id)


class Receiver:
    """An HTTP server on the loopback that records each POST it answers (204)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


SECRET = "whsec_" + base64.b64encode(b"batch-webhook-test-key").decode()


def test_an_ended_batch_is_told_to_its_webhook_signed(rig: Callable[..., BatchRig]) -> None:
    bench = rig(webhook_secret=SECRET, webhook_allow_private=True)
    receiver = Receiver()
    try:
        uploaded = upload(bench.acme, [chat_line("a"), chat_line("b")])
        hook = {"webhook": receiver.url}  # our extension: the client sends it as an extra field
        batch = bench.acme.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body=hook,
        )
        assert bench.run_until_ended(batch.id).status == "completed"
        with receiver.arrived:
            assert receiver.arrived.wait_for(lambda: receiver.deliveries, timeout=30)
        headers, body = receiver.deliveries[0]
        event = json.loads(body)
        assert event["object"] == "event" and event["type"] == "batch.completed"
        assert event["data"] == {"id": batch.id} and isinstance(event["created_at"], int)
        expected = sign(signing_key(SECRET), headers["webhook-id"], int(headers["webhook-timestamp"]), body)
        assert headers["webhook-signature"] == expected
    finally:
        receiver.server.shutdown()
    with pytest.raises(openai.UnprocessableEntityError):  # checked like a job's webhook
        bench.acme.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            extra_body={"webhook": "ftp://example.com/x"},
        )  # fmt: skip


def test_a_line_claimed_by_a_feeder_that_died_is_released_again(rig: Callable[..., BatchRig]) -> None:
    bench = rig()
    uploaded = upload(bench.acme, [chat_line(f"s-{i}") for i in range(3)])
    batch = bench.acme.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    bench.step(work_too=False)  # validated; all 3 released
    ledger = BatchLedger(bench.redis)
    # Another feeder claimed one more line, then died before its job existed: a claim with no job.
    bench.redis.hset(keys.batch("acme", batch.id), "total", 4)
    assert list(ledger.claim("acme", batch.id, 1, bench.clock())) == [3]
    bench.redis.rpush(keys.file_lines("acme", uploaded.id), json.dumps(chat_line("s-3")))
    bench.step()  # the three run; the claim is fresh, so it waits
    assert bench.acme.batches.retrieve(batch.id).status == "in_progress"
    bench.clock.advance(60)  # the claim is stale now
    batch = bench.run_until_ended(batch.id)
    assert batch.status == "completed"
    assert sorted(o["custom_id"] for o in file_lines(bench.acme, batch.output_file_id)) == [
        f"s-{i}" for i in range(4)
    ]
