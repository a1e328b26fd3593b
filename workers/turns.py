"""Chat sessions' turns in a worker's batch: a turn starts from the keys and values its session's last
turn left on this worker, and an ended turn leaves its own for the next, the scheduler told which
worker holds them (so it routes the next turn here)."""

from __future__ import annotations

import structlog
from redis import Redis

from shared.affinity import remember_worker
from shared.metrics import WorkerMetrics
from workers.sessions import Layers, SessionPrefix, SessionStore, session_key

log = structlog.get_logger()


class SessionTurns:
    """Session turns of one worker's batch, cached in `store`."""

    def __init__(
        self,
        store: SessionStore,
        redis: Redis,
        worker: str,
        ttl: int,
        model: str,
        metrics: WorkerMetrics | None = None,
    ):
        self.store, self._redis, self._worker, self._ttl = store, redis, worker, ttl
        self._model, self._metrics = model, metrics

    @staticmethod
    def key(tenant: str, session_id: str) -> str:
        """The cache key of `tenant`'s session `session_id`."""
        return session_key(tenant, session_id)

    def reuse(self, key: str, prompt_ids: list[int]) -> SessionPrefix | None:
        """The cached start of a session turn's prompt on this worker, if any (counted and logged)."""
        prefix = self.store.take(key, prompt_ids)
        if self._metrics is not None:
            hits = self._metrics.session_hits if prefix is not None else self._metrics.session_misses
            hits.labels(self._model).inc()
            if prefix is not None:
                self._metrics.prefix_tokens_reused.labels(self._model).inc(prefix.length)
        reused = prefix.length if prefix is not None else 0
        log.info(
            "session_hit" if prefix else "session_miss", prefix_tokens=reused, prompt_tokens=len(prompt_ids)
        )
        return prefix

    def keep(self, key: str, tenant: str, session_id: str, state: tuple[list[int], Layers] | None) -> None:
        """Keep an ended turn's tokens and their keys and values (`state`; None: they did not line up)
        for its session's next turn, and tell the scheduler this worker holds them."""
        if state is None or not self.store.put(key, *state):
            return
        remember_worker(self._redis, tenant, session_id, self._worker, self._ttl)
