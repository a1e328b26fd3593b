"""Entrypoint of the API process."""

from __future__ import annotations

import structlog

from api.server import ApiServer
from shared.logging import configure_logging
from shared.settings import Settings
from shared.tracing import configure_tracing


def main(settings: Settings | None = None) -> None:
    """Build settings, configure logging, serve the API until stopped."""
    settings = settings or Settings()
    configure_logging(settings, "api")
    configure_tracing(settings, "api")
    structlog.get_logger().info(
        "api_starting",
        host=settings.api_host,
        port=settings.api_port,
        worker_class=settings.api_worker_class,
        processes=settings.api_processes,
    )
    ApiServer(settings).run()
