"""A worker's memory guard: whether the device's memory lets it take more work, what it gives back under
pressure (session caches first, then what the allocator caches), and the memory budgets it sets for
session caches and a batch's KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from shared.settings import Settings
from workers.kv_budget import KvBudget, budget_bytes
from workers.memory import MemoryReading, read_memory, relieve_memory
from workers.sessions import SessionStore, session_budget

log = structlog.get_logger()

PAUSE_POLL = 0.5
"""Seconds between memory checks while paused over the critical threshold."""

REUSE_READING = 0.5
"""Seconds `may_take` reuses one memory reading (a session asks at every decode step)."""


class MemoryGuard:
    """The device's memory as one worker sees it (`clock` times the reuse of readings)."""

    def __init__(self, settings: Settings, device: str, clock: Callable[[], float] = time.monotonic):
        self.settings, self.device, self._clock = settings, device, clock
        self.kv: KvBudget | None = None
        """The batch's KV cache budget, once a batching session set it."""
        self.sessions: SessionStore | None = None
        """Session KV caches, once a session turn needed them (never when their budget is 0)."""
        self._pressure_checked, self._may_take = float("-inf"), True

    def memory(self) -> MemoryReading:
        """The device's memory now (or the test override's)."""
        return read_memory(self.device, self.settings.memory_budget_bytes, self.settings.memory_reading_file)

    def may_take(self) -> bool:
        """Memory allows taking another job now (a reading reused for REUSE_READING s); over the warn
        threshold, session caches are shed."""
        now = self._clock()
        if now - self._pressure_checked >= REUSE_READING:
            self._pressure_checked = now
            pressure = self.memory().pressure
            if pressure >= self.settings.memory_warn:
                self._shed_sessions(pressure)
            self._may_take = pressure < self.settings.memory_critical
        return self._may_take

    def pause_while_critical(self, stopping: Callable[[], bool], keep_alive: Callable[[], None]) -> None:
        """Over critical: take nothing new, give back what can be given, until below warn (or
        `stopping()`), calling `keep_alive()` while waiting."""
        if self.memory().pressure < self.settings.memory_critical:
            return
        log.warning("memory_critical_paused", pressure=round(self.memory().pressure, 3))
        self._shed_sessions(self.memory().pressure)
        relieve_memory(self.device)
        while not stopping() and self.memory().pressure >= self.settings.memory_warn:
            keep_alive()
            time.sleep(PAUSE_POLL)
        log.info("memory_pressure_relieved", pressure=round(self.memory().pressure, 3))

    def out_of_memory(self) -> None:
        """A prefill or a decode step ran out of memory: give back session caches and cached blocks."""
        self._shed_sessions(1.0)
        relieve_memory(self.device)
        self._pressure_checked = float("-inf")  # the next `may_take` reads the memory afresh

    def session_store(self) -> SessionStore | None:
        """This worker's session KV caches (None when their budget is 0)."""
        if self.sessions is None:
            budget = session_budget(self.settings.session_cache_bytes, self.memory().total)
            if budget <= 0:
                return None
            self.sessions = SessionStore(budget, self.settings.session_ttl)
        return self.sessions

    def kv_budget(self, bytes_per_token: int) -> KvBudget:
        """The batch's KV cache budget for a model of `bytes_per_token` (from settings, else a share of
        the device's memory); set once."""
        if self.kv is None:
            total = self.memory().total
            self.kv = KvBudget(bytes_per_token, budget_bytes(self.settings.kv_cache_budget_bytes, total))
        return self.kv

    def _shed_sessions(self, pressure: float) -> None:
        """Under memory pressure, session caches go first (a later turn only prefills in full)."""
        if self.sessions is not None and len(self.sessions):
            freed = self.sessions.shed()
            log.warning("session_cache_shed", bytes=freed, pressure=round(pressure, 3))
