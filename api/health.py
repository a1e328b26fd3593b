"""`/healthz` (the process is up) and `/readyz` (it can get work done)."""

from __future__ import annotations

from flask import Blueprint, jsonify
from redis.exceptions import RedisError

from api.services import services
from shared import keys
from shared.heartbeat import SchedulerBeat, WorkerBeat, read_live

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """The API process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Redis answers, a scheduler lives and each worker queue has a live worker; else 503 and why."""
    redis = services().redis
    try:
        redis.ping()
        workers = read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
        schedulers = read_live(redis, keys.SCHEDULER_HEARTBEAT_PATTERN, SchedulerBeat)
    except RedisError as exc:
        return _answer([f"redis unreachable: {exc}"], {})
    reasons = [] if schedulers else ["no live scheduler heartbeat"]
    serving = [w for w in workers if w.state != "loading"]
    by_queue = {queue: sum(1 for w in serving if w.queue == queue) for queue in keys.WORKER_QUEUES}
    reasons += [f"no live worker heartbeat on queue {q}" for q, n in by_queue.items() if n == 0]
    return _answer(reasons, {"workers": by_queue, "schedulers": len(schedulers)})


def _answer(reasons: list[str], counts: dict):  # type: ignore[no-untyped-def]
    body: dict = {"ready": not reasons, "reasons": reasons, **counts}
    if reasons:  # a 503 carries the same error object as every other error answer
        body["error"] = {"code": "not_ready", "type": "server_error", "message": "; ".join(reasons)}
    response = jsonify(body)
    response.status_code = 200 if not reasons else 503
    return response
