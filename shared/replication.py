"""Writes that must survive a failover: acknowledged by replicas before the job store relies on them.

Redis replicates asynchronously: a primary that dies may take its last writes with it, and the
replica Sentinel promotes never saw them. For most writes that costs little (a token event, a
metric). For a few it breaks a promise: an accepted job (the client holds a 202 for a job that no
longer exists), a run's fencing token (a replica that missed an increment hands the next run the
token a paused run still holds: that zombie could write), and a job's end (the result a client
read is gone and the job runs again). After each of these the job store calls `acknowledge`, which
asks Redis (WAIT) for `replicas` copies within `timeout_ms`, and raises NotReplicated when fewer
answer: the API then answers 503 (the job may exist: an Idempotency-Key makes the retry safe), a
worker gives the run up before generating.

WAIT counts the writes of the connection it is sent on, and a pool may hand the next command
another connection; so `acknowledge` first makes a write of its own (INCR of one counter) on the
connection it waits on: the replication stream is ordered, so a replica that holds that write holds
every write made before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from redis import Redis
from redis.exceptions import RedisError

from shared import keys

log = structlog.get_logger()

ATTRIBUTE = "gptoss_acks"
"""The attribute of a Redis client that carries its Acks (a plain client has none: no waiting)."""


class NotReplicated(RedisError):
    """Fewer replicas than required acknowledged a write in time (the API answers 503)."""


@dataclass(frozen=True)
class Acks:
    """How many replicas must hold a write the job store relies on, and how long to wait for them."""

    replicas: int = 0
    timeout_ms: int = 1000

    def attach(self, client: Redis) -> None:
        """Make `client`'s job-store writes wait for these acknowledgements."""
        setattr(client, ATTRIBUTE, self)


def acknowledge(redis: Redis, what: str, *, strict: bool = True) -> None:
    """Return once the writes made so far are on the replicas `redis` requires (none: at once);
    raise NotReplicated when fewer acknowledge within the timeout (`what`: the write, for the log;
    not `strict`: a write that cannot be undone any more is only logged)."""
    acks: Acks | None = getattr(redis, ATTRIBUTE, None)
    if acks is None or acks.replicas <= 0:
        return
    pipe = redis.pipeline(transaction=False)  # one connection: the WAIT counts the INCR before it
    pipe.incr(keys.REPLICATION_MARK)
    pipe.wait(acks.replicas, acks.timeout_ms)
    _, acknowledged = pipe.execute()
    if int(acknowledged) < acks.replicas:
        log.warning("write_not_replicated", write=what, replicas=int(acknowledged), required=acks.replicas)
        if not strict:
            return
        raise NotReplicated(
            f"Redis confirmed the {what} on {acknowledged} of the {acks.replicas} replicas required "
            f"within {acks.timeout_ms} ms."
        )
