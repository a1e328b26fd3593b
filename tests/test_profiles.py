"""Profiles as data: defaults applied at submission, limits per profile, the profile's model."""

from __future__ import annotations

import pytest
from redis import Redis

from api import create_app
from shared.contract import JobRequest
from shared.jobstore.rqstore import fetch_job
from shared.profiles import apply_profile, load_profiles, max_tokens_limit
from shared.registry import load_registry, model_spec
from shared.settings import Settings


def test_three_profiles_with_sla_targets() -> None:
    profiles = load_profiles()
    assert set(profiles) == {"latency_first", "balanced", "quality_first"}
    assert (
        profiles["latency_first"].model == "gpt-oss-20b"
        and profiles["latency_first"].reasoning_effort == "low"
    )
    assert (
        profiles["quality_first"].model == "gpt-oss-120b"
        and profiles["quality_first"].reasoning_effort == "high"
    )
    for profile in profiles.values():
        assert profile.default_max_tokens <= profile.max_tokens
        assert profile.ttft_sla_s == model_spec(profile.model).ttft_sla_s


def test_registry_has_gpt_oss_with_slas_and_aliases() -> None:
    registry = load_registry()
    assert (
        registry["gpt-oss-20b"].hub_id == "openai/gpt-oss-20b" and registry["gpt-oss-20b"].ttft_sla_s == 2.0
    )
    assert (
        registry["gpt-oss-120b"].ttft_sla_s == 5.0 and registry["gpt-oss-120b"].placement == "tensor-parallel"
    )
    assert all(registry[n].chat_format == "harmony" for n in ("gpt-oss-20b", "gpt-oss-120b", "tiny-gpt-oss"))
    assert model_spec("120b").name == "gpt-oss-120b"


def test_apply_profile_fills_only_what_is_unset() -> None:
    latency = load_profiles()["latency_first"]
    filled = apply_profile(JobRequest(prompt="x"), latency, 999)
    assert (filled.max_tokens, filled.temperature, filled.top_p) == (256, 0.7, 0.95)
    assert filled.reasoning_effort == "low" and filled.profile == "latency_first"
    own = apply_profile(
        JobRequest(prompt="x", temperature=0, max_tokens=3, reasoning_effort="high"), latency, 9
    )
    assert (own.max_tokens, own.temperature, own.reasoning_effort) == (3, 0, "high")
    plain = apply_profile(JobRequest(prompt="x"), None, 99)
    assert (plain.max_tokens, plain.temperature, plain.top_p, plain.reasoning_effort) == (
        99,
        1.0,
        1.0,
        "medium",
    )
    assert max_tokens_limit(latency, 4096) == 1024 and max_tokens_limit(None, 4096) == 4096


def test_profile_names_the_model_unless_one_is_given() -> None:
    assert Settings(profile="latency_first").model == "gpt-oss-20b"
    assert Settings(profile="latency_first", model="120b").model == "gpt-oss-120b"
    assert Settings().model == "smollm2-135m"


@pytest.fixture
def client(redis: Redis, settings):  # type: ignore[no-untyped-def]
    config = settings(model="tiny-gpt-oss", profile="latency_first", observability=False)
    return create_app(config, redis).test_client()


def test_server_profile_defaults_reach_the_job(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 202, response.get_json()
    args = fetch_job(response.get_json()["id"], redis).args[0]
    assert (args["max_tokens"], args["temperature"], args["reasoning_effort"]) == (256, 0.7, "low")
    assert args["profile"] == "latency_first" and args["model"] == "tiny-gpt-oss"


def test_request_may_name_another_profile(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": "hi", "profile": "quality_first", "model": "tiny"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.get_json()
    args = fetch_job(response.get_json()["id"], redis).args[0]
    assert (args["reasoning_effort"], args["temperature"], args["profile"]) == ("high", 1.0, "quality_first")
    # The profile's default of 4096 does not fit tiny's context of 4096 with a prompt: it is shortened.
    assert 4000 < args["max_tokens"] < 4096


def test_max_tokens_over_the_profile_is_422(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 1025})
    assert response.status_code == 422
    assert "latency_first" in response.get_json()["error"]["message"]


def test_unknown_profile_is_422(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/jobs", json={"prompt": "hi", "profile": "fastest"})
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "profile_not_found"
