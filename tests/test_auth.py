"""Authentication, tenant isolation, rate limits and input limits, on a real Redis."""

from __future__ import annotations

import subprocess
import sys

import pytest
from redis import Redis

from api import create_app
from shared import keys
from shared.apikeys import create_key, list_keys
from tests.conftest import ROOT, process_env

BODY = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def app(redis: Redis, settings):  # type: ignore[no-untyped-def]
    return create_app(settings(auth=True, admin_key="bootstrap-admin"), redis).test_client()


def test_requests_without_a_valid_key_are_401(app) -> None:  # type: ignore[no-untyped-def]
    for headers in ({}, bearer("gptoss_nope_nope"), {"Authorization": "Basic abc"}):
        response = app.post("/v1/jobs", json=BODY, headers=headers)
        assert response.status_code == 401, headers
        assert response.get_json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert app.get("/v1/jobs/abc").status_code == 401


def test_probes_and_metrics_stay_open(app) -> None:  # type: ignore[no-untyped-def]
    assert app.get("/healthz").status_code == 200
    assert app.get("/readyz").status_code == 503  # answers (unready: no workers), no key needed
    assert app.get("/metrics").status_code == 200


def test_metrics_can_require_the_admin_key(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(auth=True, metrics_auth=True, admin_key="adm"), redis).test_client()
    user, _ = create_key(redis, "acme")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(user)).status_code == 401
    assert client.get("/metrics", headers=bearer("adm")).status_code == 200


def test_keys_are_stored_hashed_and_bound_to_a_tenant(app, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    key, record = create_key(redis, "acme", name="ci")
    assert app.post("/v1/jobs", json=BODY, headers=bearer(key)).status_code == 202
    stored = b"".join(v for v in redis.hgetall(keys.API_KEYS).values())
    secret = key.split("_", 2)[2]  # the secret itself may hold "_"
    assert key.encode() not in stored and secret.encode() not in stored
    job_id = redis.lrange("rq:queue:incoming", 0, -1)[0].decode()
    assert app.get(f"/v1/jobs/{job_id}", headers=bearer(key)).status_code == 200
    assert [(r.id, r.tenant) for r in list_keys(redis)] == [(record.id, "acme")]


def test_cli_creates_lists_and_revokes_keys(app, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    env = process_env(GPTOSS_REDIS_URL=redis_url)
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "cli", "keys", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    created = run("create", "--tenant", "acme", "--name", "laptop")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = key.split("_")[1]
    assert app.post("/v1/jobs", json=BODY, headers=bearer(key)).status_code == 202
    listed = run("list").stdout
    assert f"{key_id}\tacme\tuser\tactive\tlaptop" in listed and key not in listed
    assert run("revoke", key_id).returncode == 0
    assert app.post("/v1/jobs", json=BODY, headers=bearer(key)).status_code == 401  # at once
    assert "revoked" in run("list").stdout
    assert run("revoke", "nosuchid").returncode != 0


def test_a_tenant_sees_only_its_own_jobs(app, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    alice, _ = create_key(redis, "alice")
    bob, _ = create_key(redis, "bob")
    job_id = app.post("/v1/jobs", json=BODY, headers=bearer(alice)).get_json()["id"]
    assert app.get(f"/v1/jobs/{job_id}", headers=bearer(alice)).status_code == 200
    foreign = app.get(f"/v1/jobs/{job_id}", headers=bearer(bob))
    unknown = app.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=bearer(bob))
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.get_json()["error"]["code"] == unknown.get_json()["error"]["code"] == "job_not_found"
    assert app.get(f"/v1/jobs/{job_id}/events", headers=bearer(bob)).status_code == 404


def test_admin_role(app, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    user, _ = create_key(redis, "acme")
    admin, _ = create_key(redis, "ops", role="admin")
    assert app.get("/admin/capacity", headers=bearer(user)).status_code == 401
    assert app.get("/admin/capacity", headers=bearer(admin)).status_code == 200
    assert app.get("/admin/capacity", headers=bearer("bootstrap-admin")).status_code == 200
    assert app.get("/admin/debug-bundle", headers=bearer(admin)).status_code == 200
    assert app.get("/admin/rq/", headers=bearer(admin)).status_code == 200
    assert app.get("/admin/rq/", headers=bearer(user)).status_code == 401


def test_request_rate_limit_per_tenant(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(auth=True, rate_limit_requests=3), redis).test_client()
    alice, _ = create_key(redis, "alice")
    bob, _ = create_key(redis, "bob")
    for _ in range(3):
        assert client.post("/v1/jobs", json=BODY, headers=bearer(alice)).status_code == 202
    limited = client.post("/v1/jobs", json=BODY, headers=bearer(alice))
    assert limited.status_code == 429 and limited.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert client.post("/v1/jobs", json=BODY, headers=bearer(bob)).status_code == 202  # others unaffected


def test_token_rate_limit_per_tenant(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(auth=True, rate_limit_tokens=100), redis).test_client()
    alice, _ = create_key(redis, "alice")
    body = {"prompt": "Hi", "max_tokens": 60, "temperature": 0}
    assert client.post("/v1/jobs", json=body, headers=bearer(alice)).status_code == 202
    limited = client.post("/v1/jobs", json=body, headers=bearer(alice))
    assert limited.status_code == 429 and "tokens per minute" in limited.get_json()["error"]["message"]
    assert redis.ttl(next(redis.scan_iter(match=keys.RATE_LIMIT_PREFIX + "*"))) > 0


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}] * 513},
        {"prompt": "x" * 400_001},
        {"prompt": "x", "stop": ["y" * 257]},
        {"prompt": "x", "model": "m" * 129},
    ],
)
def test_input_limits_are_422(redis: Redis, settings, body: dict) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(max_body_bytes=2_000_000), redis).test_client()
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "validation_error"


def test_up_keeps_one_operator_key_until_it_is_revoked(
    redis: Redis, redis_url: str, settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from cli.up import client_key
    from shared.apikeys import authenticate, revoke

    config = settings(auth=True, data_dir=tmp_path)
    first = client_key(redis_url, config)
    assert authenticate(redis, first) is not None and client_key(redis_url, config) == first
    assert (tmp_path / "api-key").stat().st_mode & 0o777 == 0o600
    revoke(redis, first.split("_")[1])
    second = client_key(redis_url, config)
    assert second != first and authenticate(redis, second) is not None


def test_a_tenant_can_neither_cancel_nor_list_another_tenants_jobs(app, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    alice, _ = create_key(redis, "alice")
    bob, _ = create_key(redis, "bob")
    job_id = app.post("/v1/jobs", json=BODY, headers=bearer(alice)).get_json()["id"]
    refused = app.delete(f"/v1/jobs/{job_id}", headers=bearer(bob))
    assert refused.status_code == 404 and refused.get_json()["error"]["code"] == "job_not_found"
    assert app.get(f"/v1/jobs/{job_id}", headers=bearer(alice)).get_json()["status"] == "queued"
    listed = lambda key: [j["id"] for j in app.get("/v1/jobs", headers=bearer(key)).get_json()["data"]]  # noqa: E731
    assert listed(alice) == [job_id] and listed(bob) == []
    assert app.delete(f"/v1/jobs/{job_id}", headers=bearer(alice)).status_code == 200
