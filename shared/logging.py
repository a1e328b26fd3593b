"""Logging set-up: structlog JSON on stdout (console on a TTY), stdlib loggers rendered the same."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from shared.settings import Settings
from shared.tracing import current_ids


def configure_logging(settings: Settings, process: str) -> None:
    """Configure structlog and the stdlib root logger once, in a process's entrypoint."""
    use_console = settings.log_format == "console" or (settings.log_format == "auto" and sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    shared_processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_process(process, settings.telemetry_identity()),
        _add_trace_ids,
    ]
    structlog.configure(
        processors=[
            *shared_processors,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Libraries that install their own handlers would print twice or in their own format.
    for name in ("rq", "rq.worker", "werkzeug", "gunicorn.error", "gunicorn.access"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True


Event = MutableMapping[str, Any]


def _add_trace_ids(_logger: object, _method: str, event: Event) -> Event:
    """Every line inside a span names its trace, whether the trace is sampled or not."""
    for key, value in current_ids().items():
        event.setdefault(key, value)
    return event


def _add_process(process: str, identity: dict[str, str]) -> structlog.typing.Processor:
    """Every line names its process and where it runs (cluster, region, instance)."""

    def add(_logger: object, _method: str, event: Event) -> Event:
        event.setdefault("process", process)
        for key, value in identity.items():
            event.setdefault(key, value)
        return event

    return add
