"""Who is calling: API-key authentication, the caller's tenant, and jobs only the owner sees."""

from __future__ import annotations

from typing import Any

import structlog
from flask import g, request

from api.services import services
from shared import keys
from shared.apikeys import ApiKey, authenticate
from shared.errors import JobExpired, JobNotFound, Unauthorized
from shared.jobstore import lifecycle
from shared.retention import tombstone

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
"""Paths anyone may call: probes and the API description."""


def bearer_token() -> str:
    """The token of an `Authorization: Bearer` header, or ''."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def caller_key() -> ApiKey | None:
    """The active API key the request presents, or None."""
    token = bearer_token()
    return authenticate(services().redis, token) if token else None


def authenticate_request() -> None:
    """Before each request: find the caller's tenant, or refuse with 401. Admin paths check the
    admin role themselves; probes, the API description and (unless configured) /metrics are open."""
    settings = services().settings
    g.tenant, g.key_id = keys.DEFAULT_TENANT, None
    path = request.path
    if path in OPEN_PATHS or path.startswith("/admin") or (path == "/metrics" and not settings.metrics_auth):
        return
    if path == "/metrics":
        from api.auth import check_admin

        check_admin()
        return
    if not settings.auth:
        return
    key = caller_key()
    if key is None:
        raise Unauthorized(
            "This endpoint needs an API key as `Authorization: Bearer <key>` (create one with "
            "`gptoss keys create`).",
            headers={"WWW-Authenticate": 'Bearer realm="gptoss"'},
        )
    g.tenant, g.key_id = key.tenant, key.id
    structlog.contextvars.bind_contextvars(tenant=key.tenant, key_id=key.id)


def current_tenant() -> str:
    """The tenant of the current request."""
    return str(g.get("tenant", keys.DEFAULT_TENANT))


def owned_job(job_id: str) -> Any:
    """The job `job_id` if it belongs to the caller's tenant; JobNotFound otherwise, exactly as for
    an id that does not exist, so ids of other tenants reveal nothing."""
    job = lifecycle.fetch(services().redis, job_id)
    if job is None:
        grave = tombstone(services().redis, job_id)
        if grave is not None and grave.get("tenant") == current_tenant():
            raise JobExpired(
                f"The job `{job_id}` has expired: its record and result are kept "
                f"{grave.get('retention')} s after it ends."
            )
        raise JobNotFound(f"No job `{job_id}`.")
    if lifecycle.read(job).tenant_or_default != current_tenant():
        raise JobNotFound(f"No job `{job_id}`.")
    return job
