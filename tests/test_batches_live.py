"""A batch through the real processes (gunicorn API, scheduler with its feeder thread, a worker) on
tiny-gpt-oss, with the official `openai` client over HTTP."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from tests.conftest import Stack, start_stack, wait_for


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    running, procs = start_stack(
        redis_url, prepared_models.cache_dir, tmp_path_factory.mktemp("batches"), "tiny-gpt-oss"
    )
    try:
        yield running
    finally:
        procs.stop_all()


def test_the_schedulers_feeder_runs_a_batch_to_completion(stack: Stack) -> None:
    client = stack.client()
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": f"Count to {i}:", "max_tokens": 3, "temperature": 0}}
        for i in range(5)
    ] + [{"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {"prompt": 7}}]  # fmt: skip
    text = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = client.files.create(file=("b.jsonl", io.BytesIO(text)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )

    def ended() -> bool:
        nonlocal batch
        batch = client.batches.retrieve(batch.id)
        return batch.status in ("completed", "failed", "expired", "cancelled")

    wait_for(ended, 120, "the batch to end", interval=0.2)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 1)
    assert batch.output_file_id is not None and batch.error_file_id is not None
    outputs = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == [f"q{i}" for i in range(5)]
    assert all(o["response"]["body"]["object"] == "text_completion" for o in outputs)
    [error] = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 422
    assert [b.id for b in client.batches.list().data] == [batch.id]
