"""Tenant keys cannot collide: tenant names are checked where keys are created (the one alphabet,
without `:`), and every Redis key built from a tenant or a client's string encodes its parts, so no
two (tenant, id) pairs share a key, even for tenants named before the rule existed."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from urllib.parse import unquote

import pytest
from click.testing import CliRunner
from redis import Redis

from shared import keys
from shared.affinity import remember_worker, worker_of
from shared.apikeys import authenticate, check_tenant, create_key, list_keys
from shared.errors import InvalidTenant, RateLimited
from shared.idempotency import claim
from shared.settings import Settings

TRICKY = [
    "", "T", "x", "s1", "T:x", "x:s1", "T:x:s1", ":", "::", "%", "%3A", "T%3Ax", "a/b", "a%2Fb",
    "*", "tenant:T", "é", "\ud800", "a b", "default",
]  # fmt: skip
"""Strings that a naive `a:b` join, or a half-done encoding, would confuse."""

PAIR_BUILDERS: dict[str, Callable[[str, str], str]] = {
    "session_affinity": keys.session_affinity,
    "session_scope": keys.session_scope,
    "idempotency": keys.idempotency,
    "scoped": keys.scoped,
}
TENANT_BUILDERS: dict[str, Callable[[str], str]] = {
    "tenant_backlog": keys.tenant_backlog,
    "tenant_jobs": keys.tenant_jobs,
    "rate_limit_identity": keys.rate_limit_identity,
    "key_part": keys.key_part,
}


def test_the_reported_collision_is_gone(redis: Redis) -> None:
    """Tenant `T:x` with session `s1` used to read tenant `T`'s session `x:s1` (its worker, hence its
    cached tokens); now they are two keys, in Redis and in a worker's session store."""
    assert keys.session_affinity("T:x", "s1") != keys.session_affinity("T", "x:s1")
    remember_worker(redis, "T", "x:s1", "worker-of-T", ttl=60)
    assert worker_of(redis, "T", "x:s1") == "worker-of-T"
    assert worker_of(redis, "T:x", "s1") is None
    from workers.sessions import session_key  # the worker's in-memory store of KV caches

    assert session_key("T:x", "s1") != session_key("T", "x:s1")


@pytest.mark.parametrize("name", sorted(PAIR_BUILDERS))
def test_pair_builders_are_injective(name: str) -> None:
    build = PAIR_BUILDERS[name]
    pairs = list(itertools.product(TRICKY, repeat=2))
    built = {build(a, b) for a, b in pairs}
    assert len(built) == len(pairs)


@pytest.mark.parametrize("name", sorted(TENANT_BUILDERS))
def test_tenant_builders_are_injective(name: str) -> None:
    build = TENANT_BUILDERS[name]
    assert len({build(t) for t in TRICKY}) == len(TRICKY)


def test_parts_hold_no_separator_and_decode_back() -> None:
    for value in TRICKY:
        part = keys.key_part(value)
        assert ":" not in part and "/" not in part and part.isascii()
        assert unquote(part, errors="surrogatepass") == value
    # Valid tenant names pass unchanged, so their keys kept their names across this change.
    assert keys.tenant_backlog("acme.prod-1_eu") == "gptoss:backlog:tenant:acme.prod-1_eu"
    assert keys.session_affinity(keys.DEFAULT_TENANT, "chat-1") == "gptoss:session:default:chat-1"


def test_families_do_not_share_keys() -> None:
    pairs = list(itertools.product(TRICKY, repeat=2))
    built = [keys.session_affinity(a, b) for a, b in pairs] + [keys.idempotency(a, b) for a, b in pairs]
    built += [keys.tenant_backlog(t) for t in TRICKY] + [keys.tenant_jobs(t) for t in TRICKY]
    assert len(set(built)) == len(built)


def test_tenant_alphabet() -> None:
    for good in ("default", "acme", "a.b-c_d", "A9", "x" * 64):
        assert check_tenant(good) == good
    for bad in ("", "T:x", "a/b", "a b", "x" * 65, "é", "acme\n", "a*"):
        with pytest.raises(InvalidTenant):
            check_tenant(bad)
    error = InvalidTenant("bad")
    assert error.status == 422 and error.to_dict()["error"]["code"] == "invalid_tenant"


def test_a_tenant_with_the_separator_is_refused_at_creation(
    redis: Redis, settings: Callable[..., Settings]
) -> None:
    with pytest.raises(InvalidTenant) as refused:
        create_key(redis, "T:x")
    assert refused.value.to_dict()["error"]["code"] == "invalid_tenant"
    assert redis.hlen(keys.API_KEYS) == 0 and redis.hlen(keys.API_KEY_IDS) == 0  # nothing written

    from cli.main import cli

    env = {"GPTOSS_REDIS_URL": settings().redis_url_or_default()}
    answer = CliRunner().invoke(cli, ["keys", "create", "--tenant", "T:x"], env=env)
    assert answer.exit_code == 2 and "--tenant" in answer.output and "letters, digits" in answer.output
    assert redis.hlen(keys.API_KEYS) == 0
    made = CliRunner().invoke(cli, ["keys", "create", "--tenant", "acme"], env=env)
    assert made.exit_code == 0, made.output
    assert [k.tenant for k in list_keys(redis)] == ["acme"]


def test_a_tenant_named_before_the_rule_keeps_working_and_apart(
    redis: Redis, settings: Callable[..., Settings]
) -> None:
    """A key of tenant `T:x` stored before names were checked still authenticates; its rate-limit
    window and Idempotency-Keys are its own, not tenant `T`'s."""
    from api.ratelimit import TenantLimits
    from shared.apikeys import ApiKey, _digest

    record = ApiKey(id="old1", tenant="T:x", created_at=0.0)
    redis.hset(keys.API_KEYS, _digest("gptoss_old1_secret"), record.model_dump_json())
    key = authenticate(redis, "gptoss_old1_secret")
    assert key is not None and key.tenant == "T:x"

    limits = TenantLimits(settings(rate_limit_requests=1), redis)
    limits.charge("T", 1)
    limits.charge("T:x", 1)  # a window of its own: not refused by T's
    with pytest.raises(RateLimited):
        limits.charge("T", 1)

    assert claim(redis, "T", "key-1", "digest-a") is None
    assert claim(redis, "T:x", "key-1", "digest-b") is None  # not T's claim, so no conflict
    stored = json.loads(redis.get(keys.idempotency("T:x", hashlib.sha256(b"key-1").hexdigest())) or b"{}")
    assert stored["digest"] == "digest-b"
