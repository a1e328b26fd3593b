"""The capacity picture shared by `/admin/capacity` and the debug bundle: workers with their memory
levels, queue depths, held jobs and the drain rate."""

from __future__ import annotations

from typing import Any

from redis import Redis

from shared import keys
from shared.drain import drain_rate
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore import lifecycle, rqstore
from shared.settings import Settings


def level(pressure: float, settings: Settings) -> str:
    """ok, warn or critical, by the settings' thresholds."""
    if pressure >= settings.memory_critical:
        return "critical"
    return "warn" if pressure >= settings.memory_warn else "ok"


def capacity_view(redis: Redis, settings: Settings) -> dict[str, Any]:
    """Everything the scheduler decides from, as one JSON-ready document."""
    workers = [
        {**beat.model_dump(), "level": level(beat.pressure, settings)}
        for beat in read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
    ]
    held = []
    for raw in redis.zrange(keys.SCHEDULER_HELD, 0, 99):
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        job = lifecycle.fetch(redis, job_id)
        reason = lifecycle.read(job).held if job is not None else None
        if job is not None:
            held.append({"id": job_id, **(reason.model_dump() if reason is not None else {})})
    return {
        "thresholds": {"warn": settings.memory_warn, "critical": settings.memory_critical,
                       "long_prompt_tokens": settings.long_prompt_tokens,
                       "multi_gpu_threshold": settings.multi_gpu_threshold,
                       "hold_timeout": settings.hold_timeout},
        "workers": sorted(workers, key=lambda w: (w["queue"], w["name"])),
        "queues": {name: rqstore.open_queue(name, redis).count for name in rqstore.waiting_queues(redis)},
        "held": held,
        "backlog": lifecycle.waiting_count(redis),
        "backlog_budget": settings.backlog_budget,
        "drain_rate_per_second": drain_rate(redis),
    }  # fmt: skip
