"""RQ queues and jobs as every process opens them: one serializer, so the API never unpickles."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from shared import keys

SERIALIZER = JSONSerializer
"""Job arguments, meta and results are plain JSON: safe to read from any process."""


def open_queue(name: str, redis: Redis) -> Queue:
    """The RQ queue called `name`."""
    return Queue(name, connection=redis, serializer=SERIALIZER)


def fetch_job(job_id: str, redis: Redis) -> Job:
    """The RQ job `job_id` (raises rq.exceptions.NoSuchJobError)."""
    return Job.fetch(job_id, connection=redis, serializer=SERIALIZER)


def own_queue_names(redis: Redis) -> list[str]:
    """The workers' own queues (`worker:<name>`) registered in RQ now, sorted."""
    prefix = Queue.redis_queue_namespace_prefix
    names = (m.decode() if isinstance(m, bytes) else m for m in redis.smembers(Queue.redis_queues_keys))
    return sorted(n[len(prefix) :] for n in names if n.startswith(prefix + keys.OWN_QUEUE_PREFIX))


def waiting_queues(redis: Redis) -> list[str]:
    """Every queue a job can wait in: the fixed ones, then the workers' own queues."""
    return [*keys.ALL_QUEUES, *own_queue_names(redis)]
