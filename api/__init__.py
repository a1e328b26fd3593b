"""The HTTP API process.

`create_app` is imported on first use, not with the package: `python -m api` must let gevent patch
the standard library before Flask, Redis or SSL are imported.
"""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from api.app import create_app

        return create_app
    raise AttributeError(name)
