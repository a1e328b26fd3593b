"""Admin authentication: `Authorization: Bearer <GPTOSS_ADMIN_KEY>` guards `/admin/*`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import request

from api.services import services
from shared.errors import AdminDisabled, Unauthorized


def check_admin() -> None:
    """Raise unless the request carries the admin key (compared in constant time)."""
    key = services().settings.admin_key
    if key is None or not key.get_secret_value():  # an empty key would let an empty Bearer in
        raise AdminDisabled("Admin endpoints are off: set GPTOSS_ADMIN_KEY to turn them on.")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
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
