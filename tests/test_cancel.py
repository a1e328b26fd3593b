"""Cancelling jobs on the real processes serving SmolLM2 (slow enough per token to catch a job mid-run):
DELETE of a queued and of a running job, and a client that disconnects from a streamed or a sync
OpenAI call. A long job here is a counting prompt the model continues until max_tokens."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
import requests

from shared import keys
from tests.conftest import Stack, start_stack, wait_for

LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 2000, "temperature": 0}
"""A job that would run for minutes: SmolLM2 keeps counting."""


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running, procs = start_stack(
        redis_url, prepared_models.cache_dir, tmp_path_factory.mktemp("cancel"), "smollm2-135m",
        GPTOSS_TORCH_THREADS=1, GPTOSS_MAX_BATCH_SIZE=2,  # two batch slots: a third job waits
    )  # fmt: skip
    try:
        yield running
    finally:
        procs.stop_all()


def job(stack: Stack, job_id: str) -> dict:
    return requests.get(f"{stack.base}/v1/jobs/{job_id}", headers=stack.headers(), timeout=5).json()


def submit(stack: Stack, body: dict) -> str:
    response = requests.post(f"{stack.base}/v1/jobs", json=body, headers=stack.headers(), timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def tokens_streamed(stack: Stack, job_id: str) -> int:
    entries = stack.redis.xrange(keys.job_stream(job_id))
    return sum(1 for _, fields in entries if fields[b"event"] == b"token")


def wait_status(stack: Stack, job_id: str, status: str, timeout: float = 90) -> dict:
    wait_for(lambda: job(stack, job_id)["status"] == status, timeout, f"job {job_id} to be {status}", 0.2)
    return job(stack, job_id)


def test_cancel_a_queued_and_a_running_job(stack: Stack) -> None:
    running, filler = submit(stack, LONG), submit(stack, LONG)  # both batch slots taken
    wait_for(lambda: tokens_streamed(stack, running) >= 3, 90, "the long job to generate")
    wait_for(lambda: tokens_streamed(stack, filler) >= 1, 90, "the second long job to generate")
    queued = submit(stack, {**LONG, "max_tokens": 8})
    wait_for(lambda: job(stack, queued)["status"] == "scheduled", 30, "the second job to wait for the worker")

    # Queued: ended at once, and taken out of the worker's queue.
    response = requests.delete(f"{stack.base}/v1/jobs/{queued}", headers=stack.headers(), timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["error"]["code"] == "job_cancelled"
    assert queued.encode() not in stack.redis.lrange(f"rq:queue:{keys.SINGLE_QUEUE}", 0, -1)

    # Running: stops at its next decode step, long before max_tokens.
    response = requests.delete(f"{stack.base}/v1/jobs/{running}", headers=stack.headers(), timeout=5)
    assert response.status_code == 202 and response.json()["status"] == "cancelling"
    view = wait_status(stack, running, "cancelled")
    assert view["error"]["code"] == "job_cancelled" and "tokens" in view["error"]["message"]
    generated = tokens_streamed(stack, running)
    assert 3 <= generated < LONG["max_tokens"] // 4
    assert job(stack, queued)["status"] == "cancelled"  # it never ran
    # Cancelling again is harmless; a finished job cannot be cancelled.
    again = requests.delete(f"{stack.base}/v1/jobs/{running}", headers=stack.headers(), timeout=5)
    assert again.status_code == 200

    # The slot is free: the next job runs on the same worker and finishes.
    after = submit(stack, {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    wait_status(stack, after, "finished")
    ended = requests.delete(f"{stack.base}/v1/jobs/{after}", headers=stack.headers(), timeout=5)
    assert ended.status_code == 409 and ended.json()["error"]["code"] == "job_ended"
    requests.delete(f"{stack.base}/v1/jobs/{filler}", headers=stack.headers(), timeout=5)
    wait_status(stack, filler, "cancelled")
    # The stream of the cancelled job ends with its error event.
    last = stack.redis.xrevrange(keys.job_stream(running), count=1)[0][1]
    assert last[b"event"] == b"error" and json.loads(last[b"data"])["code"] == "job_cancelled"


def test_streamed_chat_tokens_arrive_before_the_end_and_a_disconnect_cancels(stack: Stack) -> None:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Count from 1 to 500, separated by commas."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    response = requests.post(
        f"{stack.base}/v1/chat/completions", json=body, headers=stack.headers(), stream=True, timeout=60
    )
    job_id = response.headers["x-job-id"]
    contents = []
    lines = response.iter_lines(decode_unicode=True)
    for line in lines:
        if line.startswith("data: "):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                contents.append(delta["content"])
                if len(contents) == 3:
                    # Asked while still reading: leaving the loop ends the line iterator, and urllib3
                    # may then close the connection at once, which is already the disconnect.
                    assert job(stack, job_id)["status"] == "started"  # tokens came while it runs
                    break
    assert len(contents) == 3
    response.close()  # the client goes away mid-stream
    view = wait_status(stack, job_id, "cancelled")
    assert view["error"]["code"] == "job_cancelled"
    assert tokens_streamed(stack, job_id) < body["max_tokens"] // 4


def test_a_sync_call_whose_client_leaves_cancels_its_job(stack: Stack) -> None:
    body = json.dumps({"model": "smollm2-135m", **LONG}).encode()
    port = int(stack.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {stack.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

        def started() -> str | None:
            jobs = requests.get(f"{stack.base}/v1/jobs?limit=1", headers=stack.headers(), timeout=5).json()
            newest = jobs["data"][0] if jobs["data"] else None
            return newest["id"] if newest and newest["status"] == "started" and newest["model"] else None

        wait_for(lambda: started() is not None and tokens_streamed(stack, str(started())) >= 2, 90, "the job")
        job_id = str(started())
    view = wait_status(stack, job_id, "cancelled")  # the socket closed: the API cancelled the job
    assert tokens_streamed(stack, job_id) < LONG["max_tokens"] // 4
    assert "closed the connection" in view["error"]["message"] or "tokens" in view["error"]["message"]
