"""The front door refuses every malformed input with a JSON error and a stable code: no 500, no
lossy coercion, no silently ignored parameter (issue #18). Against the real app and a real Redis."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog
from redis import Redis

from api import create_app
from shared import keys
from shared.cancellation import request_cancel
from shared.contract import MAX_TEXT_CHARS, JobSubmission
from shared.jobstore.events import ClientGone
from shared.jobstore.rqstore import fetch_job, open_queue
from shared.json_body import MAX_JSON_DEPTH, json_depth
from tests.conftest import schedule_all, work

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
SUBMITTING = {"/v1/jobs": {"prompt": "hi"}, CHAT: {"messages": MESSAGES}, "/v1/completions": {"prompt": "hi"}}
"""Each endpoint that takes a body, and a minimal valid body for it."""


@pytest.fixture
def client(redis: Redis, settings):  # type: ignore[no-untyped-def]
    return create_app(settings(max_tokens_limit=512), redis).test_client()


def post_raw(client, path: str, raw: bytes):  # type: ignore[no-untyped-def]
    return client.post(path, data=raw, content_type="application/json")


def error_of(response, status: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.is_json
    return response.get_json()["error"]


def accepted(client, path: str, body: dict[str, Any]) -> bool:  # type: ignore[no-untyped-def]
    """The body passed validation: a job (202) or, for the OpenAI endpoints, a stream that started
    (asked for with `stream: true`, so the test does not wait for a worker)."""
    if path != "/v1/jobs":
        body = {**body, "stream": True}
    response = client.post(path, json=body, buffered=False)
    response.close()
    assert response.status_code in (200, 202), response.get_data(as_text=True)
    return True


@pytest.mark.parametrize("path", [*SUBMITTING])
def test_json_nested_past_the_limit_is_400_not_a_recursion_error(client, redis: Redis, path: str) -> None:  # type: ignore[no-untyped-def]
    deep = b"[" * 5000 + b"]" * 5000
    assert error_of(post_raw(client, path, deep), 400)["code"] == "json_too_deep"
    inside = json.dumps({**SUBMITTING[path], "stop": 1}).replace("1", "[" * 5000 + "]" * 5000, 1)
    assert error_of(post_raw(client, path, inside.encode()), 400)["code"] == "json_too_deep"
    # At the limit it parses, and the model says what is wrong with the field.
    nested = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    at_limit = json.dumps({**SUBMITTING[path], "stop": 1}).replace("1", nested, 1)
    assert error_of(post_raw(client, path, at_limit.encode()), 422)["code"] == "validation_error"
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0


@pytest.mark.parametrize(
    ("text", "depth"),
    [("{}", 1), ('{"a": "[[[{{{"}', 1), ('[1, "x\\"[", [2]]', 2), ('{"a":[{"b":[]}]}', 4), ('"[[[', 0),
     ('[[["', 3), ("[" * 100, MAX_JSON_DEPTH + 1), ("", 0)],
)  # fmt: skip
def test_depth_scan_skips_strings(text: str, depth: int) -> None:
    assert json_depth(text.encode()) == depth


@pytest.mark.parametrize("path", [*SUBMITTING])
def test_a_body_not_in_utf8_is_400(client, path: str) -> None:  # type: ignore[no-untyped-def]
    for raw in (b'{"prompt": "caf\xe9"}', json.dumps(SUBMITTING[path]).encode("utf-16")):
        assert error_of(post_raw(client, path, raw), 400)["code"] == "invalid_encoding"


@pytest.mark.parametrize("path", [*SUBMITTING])
def test_a_lone_surrogate_is_422(client, redis: Redis, path: str) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps(SUBMITTING[path]).replace('"hi"', '"a\\ud800b"')  # json.dumps writes none
    error = error_of(post_raw(client, path, body.encode()), 422)
    assert error["code"] == "lone_surrogate"
    assert error["details"][0]["loc"] in (["prompt"], ["messages", 0, "content"])
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0
    # A surrogate pair is one character, and welcome.
    assert accepted(client, path, json.loads(body.replace("\\ud800", "\\ud83d\\ude00")))


def test_text_parts_over_the_limit_together_are_422(client) -> None:  # type: ignore[no-untyped-def]
    half = MAX_TEXT_CHARS // 2 + 1
    parts = [{"type": "text", "text": "a" * half}, {"type": "text", "text": "b" * half}]
    error = error_of(client.post(CHAT, json={"messages": [{"role": "user", "content": parts}]}), 422)
    assert error["code"] == "validation_error"
    assert error["details"][0]["type"] == "string_too_long"
    assert error["details"][0]["loc"] == ["messages", 0]


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_are_refused(client, redis: Redis, literal: str) -> None:  # type: ignore[no-untyped-def]
    raw = b'{"prompt": "hi", "cancel_after": ' + literal.encode() + b"}"
    assert error_of(post_raw(client, "/v1/jobs", raw), 400)["code"] == "non_finite_number"
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal.encode() + b"}"
    assert error_of(post_raw(client, CHAT, raw), 400)["code"] == "non_finite_number"
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0


def test_models_refuse_non_finite_floats_themselves() -> None:
    for field in ("cancel_after", "temperature", "top_p"):
        with pytest.raises(ValueError, match="finite"):
            JobSubmission.model_validate({"prompt": "hi", field: float("inf")})


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [("/v1/jobs", "max_tokens", True), ("/v1/jobs", "max_tokens", "3"), ("/v1/jobs", "max_tokens", 3.0),
     ("/v1/jobs", "seed", "7"), ("/v1/jobs", "cache", "no"), ("/v1/jobs", "cache", 0),
     ("/v1/jobs", "temperature", True), ("/v1/jobs", "temperature", "1"), ("/v1/jobs", "cancel_after", "5"),
     (CHAT, "max_tokens", True), (CHAT, "max_tokens", "3"), (CHAT, "max_completion_tokens", False),
     (CHAT, "stream", "yes"), (CHAT, "cache", "no"), (CHAT, "top_p", "0.5"),
     (CHAT, "stream_options", {"include_usage": "yes"}), ("/v1/completions", "stream", 1), (CHAT, "n", True),
     (CHAT, "logprobs", "yes"), ("/v1/completions", "logprobs", True)],
)  # fmt: skip
def test_a_bool_or_a_string_is_not_coerced(client, path: str, field: str, value: Any) -> None:  # type: ignore[no-untyped-def]
    error = error_of(client.post(path, json={**SUBMITTING[path], field: value}), 422)
    assert error["code"] == "validation_error"
    assert error["details"][0]["loc"][0] == field


@pytest.mark.parametrize("path", [*SUBMITTING])
def test_an_integer_is_still_a_float(client, path: str) -> None:  # type: ignore[no-untyped-def]
    assert accepted(client, path, {**SUBMITTING[path], "temperature": 1, "top_p": 1, "max_tokens": 4})


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [(CHAT, "frequency_penalty", 0.5), (CHAT, "presence_penalty", -1), (CHAT, "logit_bias", {"50256": -100}),
     (CHAT, "functions", [{"name": "f"}]),
     ("/v1/completions", "echo", True), ("/v1/completions", "best_of", 2),
     ("/v1/completions", "suffix", "end")],
)  # fmt: skip
def test_an_unimplemented_parameter_is_422_naming_it(
    client, redis: Redis, path: str, field: str, value: Any
) -> None:  # type: ignore[no-untyped-def]
    error = error_of(client.post(path, json={**SUBMITTING[path], field: value}), 422)
    assert error["code"] == "unsupported_parameter"
    assert f"`{field}`" in error["message"]
    assert error["details"] == [{"loc": [field], "msg": error["message"], "type": "unsupported_parameter"}]
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0


def test_sdk_defaults_of_unimplemented_parameters_are_accepted(client) -> None:  # type: ignore[no-untyped-def]
    defaults = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "tools": [],
                "tool_choice": "none", "logit_bias": {}, "response_format": {"type": "text"},
                "parallel_tool_calls": True, "top_logprobs": None, "store": False, "user": "u-1"}  # fmt: skip
    assert accepted(client, CHAT, {**SUBMITTING[CHAT], **defaults})
    legacy = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "frequency_penalty": 0}
    assert accepted(client, "/v1/completions", {**SUBMITTING["/v1/completions"], **legacy})


def test_a_message_field_beyond_role_and_content_is_refused_unless_default(client) -> None:  # type: ignore[no-untyped-def]
    named = [{"role": "user", "content": "hi", "name": "bob"}]
    error = error_of(client.post(CHAT, json={"messages": named}), 422)
    assert error["code"] == "unsupported_parameter"
    assert error["details"][0]["loc"] == ["messages", 0, "name"]
    # An answer sent back as it came (the SDK's nulls, our reasoning_content) is a valid turn.
    answer = {"role": "assistant", "content": "Paris.", "refusal": None, "tool_calls": None,
              "audio": None, "function_call": None, "reasoning_content": "The capital..."}  # fmt: skip
    assert accepted(client, CHAT, {"messages": [*MESSAGES, answer, *MESSAGES]})


@pytest.mark.parametrize("path", [*SUBMITTING])
def test_an_unknown_field_is_422(client, path: str) -> None:  # type: ignore[no-untyped-def]
    error = error_of(client.post(path, json={**SUBMITTING[path], "temprature": 0.5}), 422)
    assert error["code"] == "validation_error"
    assert error["details"][0] == {"loc": ["temprature"], "msg": "Extra inputs are not permitted",
                                   "type": "extra_forbidden"}  # fmt: skip


def test_json_that_parsers_read_differently_is_400(client) -> None:  # type: ignore[no-untyped-def]
    twice = b'{"prompt": "hi", "max_tokens": 4, "max_tokens": 400}'
    assert error_of(post_raw(client, "/v1/jobs", twice), 400)["code"] == "duplicate_key"
    huge = b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}"
    assert error_of(post_raw(client, "/v1/jobs", huge), 400)["code"] == "invalid_json"


@pytest.mark.parametrize("deadline", ["2030-01-01T00:00:00", "1900000000", True])
def test_a_deadline_must_be_unambiguous(client, deadline: Any) -> None:  # type: ignore[no-untyped-def]
    error = error_of(client.post("/v1/jobs", json={"prompt": "hi", "deadline": deadline}), 422)
    assert error["details"][0]["loc"] == ["deadline"]


def test_a_finite_cancel_after_gives_a_valid_json_view(client) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/v1/jobs", json={"prompt": "hi", "cancel_after": 1e300}).get_json()
    view = client.get(job["url"])
    assert json.loads(view.get_data(as_text=True), parse_constant=pytest.fail)["deadline"] > 1e299


@pytest.mark.parametrize("limit", ["1_0", " 5", "١٠", "0", "101", "9" * 5000])
def test_a_list_limit_is_plain_digits(client, limit: str) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/v1/jobs", query_string={"limit": limit})
    assert error_of(response, 422)["code"] == "validation_error"


@pytest.mark.parametrize(("method", "path", "allowed"), [("put", "/v1/jobs", {"GET", "POST"}),
                                                          ("delete", CHAT, {"POST"})])  # fmt: skip
def test_405_is_json_and_says_what_is_allowed(client, method: str, path: str, allowed: set[str]) -> None:  # type: ignore[no-untyped-def]
    response = getattr(client, method)(path)
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


def test_a_cancelled_job_ends_at_info_without_a_traceback(  # type: ignore[no-untyped-def]
    streaming_stack, redis: Redis, runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.run import JobRun
    from workers.tiny_model import CONVERSATIONS

    config, app, scheduler = streaming_stack
    question = CONVERSATIONS[0][0]
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 200, "temperature": 0}
    job_id = app.post("/v1/jobs", json=body).get_json()["id"]
    schedule_all(scheduler, redis)
    first_token = JobRun.first_token

    def cancel_at_first_token(run: JobRun) -> None:  # the client cancels as the answer starts
        first_token(run)
        request_cancel(redis, run.job.id, 3600)

    monkeypatch.setattr(JobRun, "first_token", cancel_at_first_token)
    monkeypatch.setattr("workers.cancels.CANCEL_POLL", 0.0)  # the flag is read at the next step
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as lines:
        work(config, redis, runtime, keys.SINGLE_QUEUE)
    view = app.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "cancelled" and "tokens" in view["error"]["message"]
    assert {line["event"] for line in lines} >= {"job_started", "job_ended_early"}
    assert all(line["log_level"] in ("debug", "info") and "exc_info" not in line for line in lines), lines
    assert not [
        r for r in caplog.records if r.levelno > logging.INFO or r.exc_info or "Traceback" in r.getMessage()
    ]
    failure = fetch_job(job_id, redis).latest_result()
    assert failure is not None and "Traceback" not in (failure.exc_string or "")


def test_a_client_gone_reaching_the_error_boundary_is_499_at_info(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings(), redis)

    def waits_for_a_client_that_left() -> None:
        raise ClientGone("job-1")

    app.add_url_rule("/test/gone", view_func=waits_for_a_client_that_left)
    with structlog.testing.capture_logs() as lines:
        response = app.test_client().get("/test/gone")
    assert error_of(response, 499)["code"] == "client_closed_request"
    gone = [line for line in lines if line["event"] == "client_gone"]
    assert gone and gone[0]["log_level"] == "info" and "exc_info" not in gone[0]
    assert not [line for line in lines if line["log_level"] in ("warning", "error")]
