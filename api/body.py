"""Reading the request's body (the rules are `shared/json_body.py`'s, which a batch line is read by too)."""

from __future__ import annotations

from typing import Any

from flask import request

from shared.json_body import decode


def read_json() -> Any:
    """The request body as JSON: 413 over MAX_CONTENT_LENGTH, 400 when it is not JSON in UTF-8 or
    nests too deep, 422 when a string holds a lone surrogate."""
    return decode(request.get_data(cache=False))  # over MAX_CONTENT_LENGTH get_data raises 413
