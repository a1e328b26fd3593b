"""`GET /metrics`: the API's own metrics plus queue, registry and liveness gauges read at scrape time.

With several API processes on the host (`api_processes`), the own metrics are every process's,
each labelled with its slot (`api/process_metrics.py`); the gauges read from Redis appear once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from api.process_metrics import EXTENSION
from api.services import services
from shared import keys
from shared.heartbeat import SchedulerBeat, WorkerBeat, read_live
from shared.jobstore import rqstore
from shared.metrics import ApiMetrics, label_process
from shared.response_cache import read_stats
from shared.settings import Settings

bp = Blueprint("metrics", __name__)

UNCOUNTED_ROUTES = ("/healthz", "/readyz", "/metrics")
"""Probes and scrapes, which the availability rule leaves out."""

RQ_ROUTES = "/admin/rq"
"""rq-dashboard's pages and assets."""

QUEUES = keys.ALL_QUEUES
"""Queues whose depth and registries the API reports, each under its name (the workers' own queues
are summed per base under keys.own_queues_label, see own_queues_by_label)."""


class RedisStateCollector(Collector):
    """Reads queue depths, registry sizes, live heartbeats and the response cache's size from Redis at
    each scrape."""

    def __init__(self, redis: Redis):
        self._redis = redis

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("gptoss_requests_waiting", "Jobs waiting in a queue", labels=["queue"])
        registry = GaugeMetricFamily(
            "gptoss_registry_jobs", "Jobs in an RQ registry of a queue", labels=["queue", "registry"]
        )
        live = GaugeMetricFamily("gptoss_workers_live", "Workers with a live heartbeat", labels=["queue"])
        schedulers = GaugeMetricFamily("gptoss_schedulers_live", "Schedulers with a live heartbeat")
        up = GaugeMetricFamily("gptoss_redis_up", "Whether Redis answered this scrape")
        cache_bytes = GaugeMetricFamily("gptoss_response_cache_bytes", "Bytes the response cache holds")
        cache_entries = GaugeMetricFamily("gptoss_response_cache_entries", "Responses the cache holds")
        try:
            for name in QUEUES:
                waiting.add_metric([name], self._redis.llen(rqstore.queue_key(name)))
                for kind, size in rqstore.registry_sizes(name, self._redis).items():
                    registry.add_metric([name, kind], size)
            workers = read_live(self._redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
            for label, own in own_queues_by_label(rqstore.own_queue_names(self._redis), workers).items():
                waiting.add_metric([label], sum(self._redis.llen(rqstore.queue_key(name)) for name in own))
                sizes = [rqstore.registry_sizes(name, self._redis) for name in own]
                for kind in rqstore.REGISTRIES:
                    registry.add_metric([label, kind], sum(s[kind] for s in sizes))
            for name in keys.WORKER_QUEUES:
                live.add_metric([name], sum(1 for w in workers if w.queue == name and w.state != "loading"))
            beats = read_live(self._redis, keys.SCHEDULER_HEARTBEAT_PATTERN, SchedulerBeat)
            schedulers.add_metric([], len(beats))
            cached = read_stats(self._redis)
            cache_bytes.add_metric([], cached.bytes)
            cache_entries.add_metric([], cached.entries)
            up.add_metric([], 1)
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        yield from (waiting, registry, live, schedulers, cache_bytes, cache_entries, up)


def own_queues_by_label(own: list[str], workers: list[WorkerBeat]) -> dict[str, list[str]]:
    """The workers' own queues grouped under their metric label: `own:<base>` by the live worker's
    queue, so autoscaling of a base counts them; plain `own` for a queue whose worker has no live
    heartbeat (the reaper moves its jobs back to `incoming`)."""
    label_of = {keys.own_queue(w.name): keys.own_queues_label(w.queue) for w in workers}
    groups: dict[str, list[str]] = {keys.own_queues_label(base): [] for base in keys.WORKER_QUEUES}
    groups[keys.OWN_QUEUES_LABEL] = []
    for name in own:
        groups.setdefault(label_of.get(name, keys.OWN_QUEUES_LABEL), []).append(name)
    return groups


def api_metrics(settings: Settings) -> ApiMetrics:
    """The API process's own metrics, in a registry of their own, its process labelled."""
    metrics = ApiMetrics(CollectorRegistry())
    # Series of the served model exist from the start (at 0), so rates and alerts have a baseline.
    metrics.start_at_zero(settings.model)
    label_process(metrics.registry, "api", settings.telemetry_identity())
    return metrics


def served_routes(app: Flask) -> list[tuple[str, str]]:
    """(method, route) of every route clients call (probes, scrapes and rq-dashboard left out), as
    `gptoss_http_requests_total` labels them."""
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule in UNCOUNTED_ROUTES or rule.rule.startswith(RQ_ROUTES):
            continue
        routes |= {(method, rule.rule) for method in rule.methods or () if method not in ("HEAD", "OPTIONS")}
    return sorted(routes)


def start_at_zero(app: Flask) -> None:
    """Once every blueprint is registered: each route's 5xx series at 0, so the availability rule
    counts the first server error (a series born at 1 has no rate)."""
    svc = app.extensions["gptoss"]
    svc.metrics.start_at_zero(svc.settings.model, served_routes(app))


class Exposition(Collector):
    """What one scrape serves: each source's families, in order."""

    def __init__(self, *sources: Collector | CollectorRegistry):
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            families: Iterable[Metric] = source.collect()
            yield from families


def exposition() -> Exposition:
    """The current app's metrics as `/metrics` serves them: the Redis state once, then the API's own
    series (every API process's, each labelled with its slot, when there are several)."""
    svc = services()
    own: Collector | CollectorRegistry = current_app.extensions.get(EXTENSION) or svc.metrics.registry
    return Exposition(RedisStateCollector(svc.redis), own)


@bp.get("/metrics")
def scrape() -> Response:
    """Prometheus exposition; OpenMetrics (with exemplars) when the scraper asks for it."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(exposition()), content_type=content_type)
