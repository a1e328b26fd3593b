"""A session's reading of its jobs' cancel flags: every row's and follower's in one read, at most every
CANCEL_POLL seconds. A cancelled row is marked (the session settles it after its step); a cancelled
follower ends at once, having decoded nothing."""

from __future__ import annotations

import sys
import time

from redis import Redis
from redis.exceptions import RedisError

from shared.cancellation import CANCEL_POLL, cancels_requested
from workers.settling import Settler
from workers.slots import Followers, Slot


class CancelReader:
    """Reads the cancel flags of a session's jobs (see the module docstring)."""

    def __init__(self, redis: Redis, settler: Settler):
        self.redis, self.settler = redis, settler
        self._read = time.monotonic()

    def read(self, slots: dict[str, Slot], followers: Followers) -> None:
        """Mark the rows of `slots` a client cancelled and end its cancelled `followers`."""
        now = time.monotonic()
        if now - self._read < CANCEL_POLL:
            return
        self._read = now
        waiting = {f.job.id: f for f in followers.all()}
        try:
            cancelled = cancels_requested(self.redis, [*slots, *waiting])
        except RedisError:  # a lost read must not fail the session; the next one reads again
            return
        for job_id in cancelled:
            if job_id in slots:
                slots[job_id].run.cancel.cancelled = True
            elif (f := waiting.get(job_id)) is not None:  # ends at once: it decodes nothing
                followers.remove(f.run.fingerprint or "", f)
                with f.run.logging():
                    try:
                        f.run.cancel_waiting()
                    except RedisError:
                        raise
                    except Exception:
                        self.settler.fail(f, sys.exc_info(), recorded=True)
