"""The API against a real Redis: submission, validation errors, polling, health and readiness."""

from __future__ import annotations

import json
import time

import pytest
from redis import Redis

from api import create_app
from shared import keys
from shared.connection import connect
from shared.heartbeat import SchedulerBeat, WorkerBeat, publish
from shared.jobstore.rqstore import fetch_job, open_queue
from tests.conftest import wait_for

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}


@pytest.fixture
def client(redis: Redis, settings):  # type: ignore[no-untyped-def]
    return create_app(settings(max_body_bytes=4096, max_tokens_limit=512), redis).test_client()


def error_of(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"]
    return body["error"]


def test_submit_enqueues_on_incoming(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json=CHAT, headers={"X-Request-ID": "req-1"})
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued"
    assert body["url"] == f"/v1/jobs/{body['id']}" == response.headers["Location"]
    assert response.headers["X-Request-ID"] == "req-1"
    assert open_queue(keys.INCOMING_QUEUE, redis).job_ids == [body["id"]]
    job = fetch_job(body["id"], redis)
    assert job.func_name == keys.GENERATE_FUNC
    assert job.args[0]["model"] == "smollm2-135m"  # the served model filled in
    assert job.args[0]["max_tokens"] == 8
    assert job.meta["request_id"] == "req-1"
    assert "capital" not in job.description  # RQ logs descriptions; prompts stay out of logs


def test_poll_shows_queued_job(client) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post("/v1/jobs", json={"prompt": "Once upon"}).get_json()["id"]
    view = client.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "queued"
    assert view["model"] == "smollm2-135m"
    assert view["timestamps"]["received"] <= time.time()
    assert "result" not in view and "route" not in view


def test_default_max_tokens_applied(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post("/v1/jobs", json={"prompt": "x"}).get_json()["id"]
    assert fetch_job(job_id, redis).args[0]["max_tokens"] == 256


def test_bad_json_is_400(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


def test_non_object_json_is_400(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", data="[1, 2]", content_type="application/json")
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a", "temperature": 7}, "temperature"),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"prompt": "a", "unknown": 1}, "unknown"),
    ],
)
def test_bad_fields_are_422(client, body: dict, field: str) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_error"
    assert any(field in detail["loc"] for detail in error["details"]), error


def test_neither_messages_nor_prompt_is_422(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"max_tokens": 3})
    assert response.status_code == 422
    assert "exactly one" in json.dumps(error_of(response))


def test_max_tokens_over_limit_is_422(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"prompt": "a", "max_tokens": 513})
    assert response.status_code == 422
    assert error_of(response)["details"][0]["loc"] == ["max_tokens"]
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0


def test_body_over_limit_is_413(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"prompt": "x" * 5000})
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert open_queue(keys.INCOMING_QUEUE, redis).count == 0


def test_unknown_model_is_404(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"prompt": "a", "model": "gpt-5"})
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"


def test_known_model_not_served_is_404(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"prompt": "a", "model": "tiny-gpt-oss"})
    assert response.status_code == 404
    assert "not served" in error_of(response)["message"]


@pytest.mark.parametrize("job_id", ["0" * 32, "no-such-job", "../../etc"])
def test_unknown_job_is_404(client, job_id: str) -> None:  # type: ignore[no-untyped-def]
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 404
    assert error_of(response)["code"] in ("job_not_found", "not_found")


def test_unknown_route_and_method_are_json(client) -> None:  # type: ignore[no-untyped-def]
    assert error_of(client.get("/v2/nothing"))["code"] == "not_found"
    response = client.put("/v1/jobs")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


def test_healthz(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").get_json() == {"status": "ok"}


def _worker(name: str, queue: str, state: str = "idle") -> WorkerBeat:
    return WorkerBeat(
        name=name, queue=queue, model="m", device="cpu", state=state, pid=1, host="h", at=time.time()
    )  # type: ignore[arg-type]


def test_readyz_needs_scheduler_and_a_worker_per_queue(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/readyz")
    assert response.status_code == 503
    reasons = response.get_json()["reasons"]
    assert "no live scheduler heartbeat" in reasons
    assert any("gpu-single" in r for r in reasons) and any("gpu-multi" in r for r in reasons)

    publish(redis, keys.scheduler_heartbeat("s"), SchedulerBeat(name="s", pid=1, host="h", at=0), 30)
    publish(redis, keys.worker_heartbeat("a"), _worker("a", keys.SINGLE_QUEUE), 30)
    publish(redis, keys.worker_heartbeat("b"), _worker("b", keys.MULTI_QUEUE, "loading"), 30)
    body = client.get("/readyz").get_json()
    assert body["reasons"] == ["no live worker heartbeat on queue gpu-multi"]  # loading is not serving

    publish(redis, keys.worker_heartbeat("b"), _worker("b", keys.MULTI_QUEUE), 1)
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["workers"] == {"gpu-single": 1, "gpu-multi": 1}

    # b's heartbeat expires: the queue has no live worker again
    wait_for(lambda: client.get("/readyz").status_code == 503, 10, "b's heartbeat to expire")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["reasons"] == ["no live worker heartbeat on queue gpu-multi"]


def test_redis_down_is_503_with_retry_after(settings) -> None:  # type: ignore[no-untyped-def]
    from cli.up import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = create_app(settings(redis_url=dead), connect(dead)).test_client()
    response = client.post("/v1/jobs", json={"prompt": "a"})
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert error_of(response)["code"] == "service_unavailable"
    assert client.get("/v1/jobs/abc").status_code == 503
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "redis unreachable" in ready.get_json()["reasons"][0]
    assert client.get("/healthz").status_code == 200


def test_empty_admin_key_turns_admin_off(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(admin_key=""), redis).test_client()
    for header in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
        response = client.get("/admin/capacity", headers=header)
        assert response.status_code == 403 and response.get_json()["error"]["code"] == "admin_disabled"
