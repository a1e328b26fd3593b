"""RQ queues and jobs as every process opens them: one serializer, so the API never unpickles."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

SERIALIZER = JSONSerializer
"""Job arguments, meta and results are plain JSON: safe to read from any process."""


def open_queue(name: str, redis: Redis) -> Queue:
    """The RQ queue called `name`."""
    return Queue(name, connection=redis, serializer=SERIALIZER)


def fetch_job(job_id: str, redis: Redis) -> Job:
    """The RQ job `job_id` (raises rq.exceptions.NoSuchJobError)."""
    return Job.fetch(job_id, connection=redis, serializer=SERIALIZER)
