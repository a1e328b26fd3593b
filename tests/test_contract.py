"""The job contract and the status a client sees."""

import pytest
from pydantic import ValidationError

from shared.contract import JobRequest, JobStatus
from shared.errors import ModelNotFound
from shared.jobstore.record import JobRecord
from shared.registry import load_registry, model_spec


def test_stop_accepts_a_string() -> None:
    assert JobRequest(prompt="hi", stop="\n").stop == ["\n"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "b"}]},
        {"prompt": "a", "temperature": 3},
        {"prompt": "a", "top_p": 0},
        {"prompt": "a", "max_tokens": 0},
        {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]},
        {"prompt": "a", "stop": [""]},
        {"prompt": "a", "colour": "blue"},
    ],
)
def test_invalid_requests_are_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate(body)


def test_status_follows_stages() -> None:
    record = JobRecord()
    assert record.status("queued") is JobStatus.QUEUED
    record.stamp("scheduled", 1.0)
    assert record.status("queued") is JobStatus.SCHEDULED
    assert record.status("started") is JobStatus.STARTED
    assert record.status("finished") is JobStatus.FINISHED
    assert record.status("failed") is JobStatus.FAILED
    rejected = JobRecord.from_meta({"rejected": {"code": "x", "message": "y"}})
    assert rejected.status("canceled") is JobStatus.REJECTED


def test_registry_is_data() -> None:
    registry = load_registry()
    assert {"smollm2-135m", "tiny-gpt-oss"} <= set(registry)
    assert registry["smollm2-135m"].source == "gguf-wheel"
    with pytest.raises(ModelNotFound):
        model_spec("gpt-5")


def test_registry_reads_other_text() -> None:
    registry = load_registry('[models.x]\nsource = "hub"\nhub_id = "a/b"\ncontext_length = 10\n')
    assert registry["x"].hub_id == "a/b"
