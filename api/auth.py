"""Admin authentication: `Authorization: Bearer <GPTOSS_ADMIN_KEY>` guards `/admin/*`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import request

from api.services import services
from shared.apikeys import authenticate
from shared.errors import AdminDisabled, Unauthorized


def check_admin() -> None:
    """Raise unless the request carries an admin API key or the bootstrap admin key (compared in
    constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if given and (record := authenticate(services().redis, given)) is not None and record.role == "admin":
        return
    key = services().settings.admin_key
    if key is None or not key.get_secret_value():  # an empty key would let an empty Bearer in
        raise AdminDisabled(
            "Admin endpoints are off: set GPTOSS_ADMIN_KEY, or use a key from `gptoss keys create --admin`."
        )
    if not given or not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized(
            "This endpoint needs the admin key as `Authorization: Bearer <key>`.",
            headers={"WWW-Authenticate": 'Bearer realm="gptoss-admin"'},
        )


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a view so only a request with the admin key reaches it."""

    @wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check_admin()
        return view(*args, **kwargs)

    return guarded
