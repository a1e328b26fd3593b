"""The debug bundle: everything needed to diagnose the system without shell access, as a .tar.gz."""

from __future__ import annotations

import io
import json
import platform
import sys
import tarfile
import time
from importlib import metadata
from typing import Any

import requests
from prometheus_client import generate_latest
from prometheus_client.registry import Collector
from redis import Redis

from shared import decisions, keys
from shared.connection import masked_url
from shared.heartbeat import SchedulerBeat, WorkerBeat, read_live
from shared.jobstore import lifecycle, rqstore
from shared.settings import Settings

FAILURES_PER_QUEUE = 20
"""Most recent failed (or rejected) jobs included per queue."""

DECISIONS_INCLUDED = 200
"""Most recent admission and routing decisions included."""

SCRAPE_TIMEOUT = 2.0
"""Seconds to wait for another process's /metrics."""

PACKAGES = ("gpt-oss-hf-server", "torch", "transformers", "rq", "redis", "flask", "pydantic",
            "prometheus-client", "opentelemetry-sdk", "openai-harmony", "gunicorn")  # fmt: skip
"""Versions reported (read from package metadata, so the API never imports torch)."""


def build_bundle(settings: Settings, redis: Redis, metrics: Collector) -> bytes:
    """The bundle as gzip-compressed tar bytes (`metrics`: what the API's /metrics serves); a section
    that cannot be read says why instead."""
    sections: dict[str, Any] = {
        "settings.json": lambda: redacted_settings(settings),
        "versions.json": lambda: versions(redis),
        "queues.json": lambda: queue_sizes(redis),
        "workers.json": lambda: workers(redis),
        "failures.json": lambda: failures(redis),
        "decisions.json": lambda: decisions.recent(redis, DECISIONS_INCLUDED),
    }
    files: dict[str, bytes] = {}
    problems: dict[str, str] = {}
    for name, read in sections.items():
        try:
            files[name] = json.dumps(read(), indent=2, default=str).encode()
        except Exception as exc:  # the bundle is for bad days: report, never fail
            problems[name] = f"{type(exc).__name__}: {exc}"
    files["metrics/api.txt"] = generate_latest(metrics)
    files.update(_scrape_others(redis, problems))
    manifest = {"generated_at": time.time(), "files": sorted(files), "problems": problems}
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    return _tar(files)


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """Settings with secrets masked: SecretStr fields and passwords inside URLs."""
    values = settings.model_dump(mode="json")  # SecretStr dumps as "**********"
    for name, value in values.items():
        if isinstance(value, str) and "://" in value:
            values[name] = masked_url(value)
    return values


def versions(redis: Redis) -> dict[str, Any]:
    """Python, platform, package versions and the Redis server's version."""
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    info = redis.info("server")
    return {"python": sys.version, "platform": platform.platform(), "packages": found,
            "redis_server": info.get("redis_version")}  # fmt: skip


def queue_sizes(redis: Redis) -> dict[str, Any]:
    """Depth and registry sizes of every queue, the workers' own queues included."""
    sizes: dict[str, Any] = {}
    for name in rqstore.waiting_queues(redis):
        waiting = redis.llen(rqstore.queue_key(name))
        sizes[name] = {"waiting": waiting, **rqstore.registry_sizes(name, redis)}
    sizes["scheduler_inflight"] = redis.llen(keys.SCHEDULER_INFLIGHT)
    return sizes


def workers(redis: Redis) -> dict[str, Any]:
    """Live heartbeats (ours) and the workers RQ knows."""
    rq_workers = rqstore.workers(redis)
    return {
        "heartbeats": [b.model_dump() for b in read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)],
        "schedulers": [
            b.model_dump() for b in read_live(redis, keys.SCHEDULER_HEARTBEAT_PATTERN, SchedulerBeat)
        ],
        "rq_workers": rq_workers,
    }


def failures(redis: Redis) -> list[dict[str, Any]]:
    """The latest failed and rejected jobs of every queue, with their tracebacks and records."""
    found: list[dict[str, Any]] = []
    for name in rqstore.waiting_queues(redis):
        for job_id in rqstore.failed_job_ids(name, redis, FAILURES_PER_QUEUE):
            job = lifecycle.fetch(redis, job_id)
            if job is None:
                continue
            found.append(
                {
                    "id": job.id,
                    "queue": name,
                    "status": job.get_status(refresh=False),
                    "ended_at": job.ended_at,
                    "meta": lifecycle.read(job).to_meta(),
                    "traceback": rqstore.traceback_of(job),
                }
            )
    return found


def _scrape_others(redis: Redis, problems: dict[str, str]) -> dict[str, bytes]:
    beats: list[WorkerBeat | SchedulerBeat] = [
        *read_live(redis, keys.SCHEDULER_HEARTBEAT_PATTERN, SchedulerBeat),
        *read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat),
    ]
    files: dict[str, bytes] = {}
    for beat in beats:
        if not beat.metrics_url:
            continue
        name = f"metrics/{beat.name}.txt"
        try:
            answer = requests.get(beat.metrics_url, timeout=SCRAPE_TIMEOUT)
            answer.raise_for_status()
            files[name] = answer.content
        except requests.RequestException as exc:
            problems[name] = str(exc)
    return files


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            entry = tarfile.TarInfo(f"gptoss-debug/{name}")
            entry.size, entry.mtime = len(content), int(time.time())
            archive.addfile(entry, io.BytesIO(content))
    return buffer.getvalue()
