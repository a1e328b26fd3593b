"""Ending a job that never ran (cancelled while waiting, past its deadline, rejected): the reason in
job.meta, RQ's cancelled state, the job's retention as its lifetime, out of its tenant's backlog."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis
from rq.exceptions import InvalidJobOperation

from shared import keys
from shared.drain import leave_backlog
from shared.stages import META_HELD, META_RETENTION, META_TENANT, STAGE_FINISHED, stamp


def retention_of(meta: dict[str, Any]) -> int:
    """Seconds the job is kept after it ends (set at submission; RQ's default for older jobs)."""
    return int(meta.get(META_RETENTION, keys.RESULT_TTL))


def end_unstarted(redis: Redis, job: Any, kind: str, code: str, message: str) -> None:
    """Record why `job` ends without running (`kind`: a META_* reason field) and end it in RQ. The
    caller has taken it out of every queue first (or holds it, as the scheduler does)."""
    job.meta.pop(META_HELD, None)
    job.meta[kind] = {"code": code, "message": message}
    stamp(job.meta, STAGE_FINISHED, time.time())
    job.save_meta()
    try:
        job.cancel()
    except InvalidJobOperation:  # already cancelled in RQ
        pass
    redis.expire(job.key, retention_of(job.meta))
    leave_backlog(redis, job.meta.get(META_TENANT), job.id)
