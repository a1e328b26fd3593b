"""The HTTP API process."""

from api.app import create_app

__all__ = ["create_app"]
