"""API keys: random bearer tokens stored only as SHA-256 hashes, each bound to a tenant and a role.

A key is `gptoss_<id>_<secret>`; the id is public (it names the key in lists and logs), the secret
is 32 random bytes. Keys are high-entropy tokens, so one fast hash is what stores them safely (as
GitHub and Stripe tokens are stored); a slow password hash would only slow every request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Literal

from pydantic import BaseModel
from redis import Redis

from shared import keys
from shared.errors import InvalidTenant

KEY_PREFIX = "gptoss"
"""First part of every API key, so leaked keys are easy to recognise and scan for."""


TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Tenant names: 1 to 64 ASCII letters, digits, `_`, `.` or `-`. No `:` (the separator of Redis key
parts) nor `/`; keys built from a tenant encode it all the same (shared.keys.key_part), which
leaves these names unchanged and keeps tenants created before this rule apart."""


def check_tenant(tenant: str) -> str:
    """`tenant` if it is a valid tenant name; InvalidTenant (422 `invalid_tenant`) otherwise."""
    if TENANT_PATTERN.fullmatch(tenant) is None:
        raise InvalidTenant(
            f"Tenant {tenant!r} is not a valid name: use 1 to 64 letters, digits, `_`, `.` or `-`.",
            details=[{"loc": ["tenant"], "pattern": TENANT_PATTERN.pattern}],
        )
    return tenant


class ApiKey(BaseModel):
    """What is stored about one key (never the key itself)."""

    id: str
    tenant: str
    role: Literal["user", "admin"] = "user"
    name: str = ""
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.revoked_at is None


def _digest(presented: str) -> str:
    return hashlib.sha256(presented.encode()).hexdigest()


def create_key(
    redis: Redis, tenant: str, role: Literal["user", "admin"] = "user", name: str = ""
) -> tuple[str, ApiKey]:
    """A new key for `tenant`: (the key, shown once; its stored record). Raises InvalidTenant for a
    name outside TENANT_PATTERN."""
    check_tenant(tenant)
    key_id = secrets.token_hex(4)
    plaintext = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(id=key_id, tenant=tenant, role=role, name=name, created_at=time.time())
    pipe = redis.pipeline()
    pipe.hset(keys.API_KEYS, _digest(plaintext), record.model_dump_json())
    pipe.hset(keys.API_KEY_IDS, key_id, _digest(plaintext))
    pipe.execute()
    return plaintext, record


def authenticate(redis: Redis, presented: str) -> ApiKey | None:
    """The active key record matching `presented`, or None."""
    raw = redis.hget(keys.API_KEYS, _digest(presented))
    if raw is None:
        return None
    record = ApiKey.model_validate_json(raw)
    return record if record.active else None


def list_keys(redis: Redis) -> list[ApiKey]:
    """Every key record, oldest first."""
    records = [ApiKey.model_validate_json(raw) for raw in redis.hvals(keys.API_KEYS)]
    return sorted(records, key=lambda r: r.created_at)


def revoke(redis: Redis, key_id: str) -> ApiKey | None:
    """Revoke the key `key_id` at once; its record, or None when there is no such key."""
    digest = redis.hget(keys.API_KEY_IDS, key_id)
    if digest is None:
        return None
    raw = redis.hget(keys.API_KEYS, digest)
    if raw is None:
        return None
    record = ApiKey.model_validate_json(raw).model_copy(update={"revoked_at": time.time()})
    redis.hset(keys.API_KEYS, digest, record.model_dump_json())
    return record
