"""Serving a process's own `/metrics` (the scheduler's and each worker's) on a port of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> str | None:
    """Serve `registry` on host:port (OpenMetrics when the scraper asks); its URL, or None when off.

    Port 0 turns the endpoint off.
    """
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return f"http://{host}:{server.server_port}/metrics"
