"""Token streaming: the worker writes a Redis stream per job, the API serves it as Server-Sent Events,
resumable with Last-Event-ID."""

from __future__ import annotations

import json

from redis import Redis

from shared import keys
from shared.jobstore.events import JobStream
from shared.jobstore.rqstore import open_queue
from tests.conftest import schedule_all, work
from workers.tiny_model import CONVERSATIONS

MODEL = "tiny-gpt-oss"


def parse_sse(body: str) -> list[dict]:
    """Events of an SSE body: each with its id (if any), event name and decoded data."""
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            events.append(
                {"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])}
            )
    return events


def run_job(streaming_stack, redis: Redis, runtime, body: dict) -> str:  # type: ignore[no-untyped-def]
    config, app, scheduler = streaming_stack
    job_id = app.post("/v1/jobs", json=body).get_json()["id"]
    schedule_all(scheduler, redis)
    work(config, redis, runtime, keys.SINGLE_QUEUE)
    return job_id


def test_sse_streams_channels_then_done(streaming_stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    question, analysis, final = CONVERSATIONS[0]
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 80, "temperature": 0}
    job_id = run_job(streaming_stack, redis, runtime, body)
    response = streaming_stack[1].get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = parse_sse(response.get_data(as_text=True))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") >= 2
    tokens = [e["data"] for e in events if e["event"] == "token"]
    assert "".join(t["text"] for t in tokens if t["channel"] == "analysis") == analysis
    assert "".join(t["text"] for t in tokens if t["channel"] == "final") == final
    done = events[-1]["data"]
    assert done["text"] == final and done["reasoning"] == analysis
    assert done["usage"]["completion_tokens"] == 30 and done["finish_reason"] == "stop"
    timings = done["timings"]
    assert timings["received"] <= timings["started"] <= timings["first_token"] <= timings["finished"]
    result = streaming_stack[1].get(f"/v1/jobs/{job_id}").get_json()["result"]
    assert (result["text"], result["reasoning"]) == (final, analysis)
    assert redis.ttl(keys.job_stream(job_id)) > 0


def test_last_event_id_resumes_after_that_event(streaming_stack, redis: Redis, runtime) -> None:  # type: ignore[no-untyped-def]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0}
    job_id = run_job(streaming_stack, redis, runtime, body)
    app = streaming_stack[1]
    everything = parse_sse(app.get(f"/v1/jobs/{job_id}/events").get_data(as_text=True))
    cut = everything[3]["id"]
    resumed = parse_sse(
        app.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": cut}).get_data(as_text=True)
    )
    assert resumed == everything[4:]
    by_query = parse_sse(app.get(f"/v1/jobs/{job_id}/events?last_event_id={cut}").get_data(as_text=True))
    assert by_query == resumed


def test_rejected_job_ends_its_stream_with_the_reason(streaming_stack, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    config, app, scheduler = streaming_stack
    payload = {"prompt": "word " * 200, "max_tokens": 4000, "model": MODEL}
    job_id = open_queue(keys.INCOMING_QUEUE, redis).enqueue(keys.GENERATE_FUNC, payload).id
    schedule_all(scheduler, redis)
    events = parse_sse(app.get(f"/v1/jobs/{job_id}/events").get_data(as_text=True))
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["data"]["code"] == "context_exceeded"


def test_unknown_job_and_bad_event_id(streaming_stack) -> None:  # type: ignore[no-untyped-def]
    app = streaming_stack[1]
    assert app.get("/v1/jobs/nope/events").status_code == 404
    job_id = app.post("/v1/jobs", json={"prompt": "hi"}).get_json()["id"]
    for bad in ("x; DROP", "1-2-3", "-", "9" * 25, f"{2**64}-0"):
        answer = app.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (400, "invalid_last_event_id"), bad


def test_stream_groups_pieces_and_breaks_at_channel_changes(redis: Redis) -> None:
    stream = JobStream(redis, "j1", group_tokens=3)
    for channel, text in [("analysis", "a"), ("analysis", "b"), ("final", "c"), ("final", "d")]:
        stream.text(channel, text)
    stream.done({"text": "cd"}, {})
    entries = redis.xrange(keys.job_stream("j1"))
    data = [json.loads(fields[b"data"]) for _, fields in entries]
    assert [fields[b"event"] for _, fields in entries] == [b"token", b"token", b"done"]
    assert data[0] == {"channel": "analysis", "text": "ab", "index": 0}
    assert data[1] == {"channel": "final", "text": "cd", "index": 2}
