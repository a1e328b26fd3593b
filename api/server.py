"""Run the API under gunicorn: one process with threads, so one metrics registry serves it all."""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from shared.settings import Settings


class JsonLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger without its own handlers: records reach the root logger, rendered as JSON.

    Access lines are dropped because the app logs each request itself, with its request id.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            logger.handlers[:] = []
            logger.propagate = True

    def access(self, *args: Any, **kwargs: Any) -> None:
        pass


class ApiServer(BaseApplication):  # type: ignore[misc]
    """gunicorn serving one already-built Flask app."""

    def __init__(self, app: Flask, settings: Settings):
        self._app, self._model = app, settings.model
        self._options: dict[str, Any] = {
            "bind": f"{settings.api_host}:{settings.api_port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": settings.api_threads,
            "timeout": 0,  # long polls and streams are normal here
            "graceful_timeout": 10,
            "logger_class": JsonLogger,
            "post_worker_init": self._warm,
            "control_socket_disable": True,  # unused, and one path per host would be shared by every API
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app

    def _warm(self, _worker: Any) -> None:
        """In the serving process, as it starts: load the default model's tokenizer in the
        background, so the first request does not wait for it."""
        from api.submission import warm_prompt_tokenizer

        threading.Thread(
            target=warm_prompt_tokenizer, args=(self._app, self._model), name="gptoss-warm", daemon=True
        ).start()
