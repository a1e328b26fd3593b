"""Session KV caches of one worker: the keys and values of a chat session's last turn, kept so its
next turn computes only its new tokens. Bounded by bytes (least recently used go first), dropped
when idle past the session TTL, shed first under memory pressure, gone when the worker restarts."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shared import keys

DEFAULT_SHARE = 0.10
"""Share of the device's memory session caches may take when no budget is configured."""

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values of every layer, each [1, kv heads, tokens, head dim]."""


def session_key(tenant: str, session_id: str) -> str:
    """One tenant's session: another tenant's same id is another session (keys.session_scope, so a
    tenant named `T:x` with session `s1` is never tenant `T`'s session `x:s1`)."""
    return keys.session_scope(tenant, session_id)


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Tokens at the start of `prompt` whose keys and values a cache of `cached` holds: their
    common prefix, less one where needed so the new turn computes at least its last prompt token
    (whose logits give the first new token)."""
    common = 0
    for old, new in zip(cached, prompt, strict=False):
        if old != new:
            break
        common += 1
    return max(0, min(common, len(prompt) - 1))


@dataclass(frozen=True)
class SessionPrefix:
    """What a new turn reuses: the keys and values of its first `length` prompt tokens."""

    length: int
    layers: Layers


@dataclass
class _Entry:
    token_ids: list[int]
    layers: Layers
    nbytes: int
    used: float


class SessionStore:
    """Sessions' KV caches within `budget` bytes; entries idle over `ttl` seconds are dropped."""

    def __init__(self, budget: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.budget, self.ttl, self._clock = budget, ttl, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # the heartbeat thread expires and measures entries too
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def take(self, key: str, prompt_ids: Sequence[int]) -> SessionPrefix | None:
        """The cached prefix of `prompt_ids` in session `key`, or None (no entry, or nothing shared)."""
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.used = self._clock()
            self._entries.move_to_end(key)
            length = reusable_prefix(entry.token_ids, prompt_ids)
            if length == 0:
                return None
            # Views, not copies: nothing writes a cache's tensors in place (layers grow by torch.cat).
            layers = [(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers]
            return SessionPrefix(length, layers)

    def put(self, key: str, token_ids: list[int], layers: Layers) -> bool:
        """Keep `layers` (the keys and values of `token_ids`) as session `key`'s cache, evicting the
        least recently used beyond the budget; False when it alone is over the budget."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        with self._lock:
            self._drop(key)
            if nbytes > self.budget:
                return False
            self._entries[key] = _Entry(token_ids, layers, nbytes, self._clock())
            self.nbytes += nbytes
            while self.nbytes > self.budget:
                self._drop(next(iter(self._entries)))
            return True

    def expire(self) -> None:
        """Drop the sessions idle for longer than the TTL."""
        with self._lock:
            self._expire()

    def shed(self) -> int:
        """Drop every session (memory pressure); the bytes freed."""
        with self._lock:
            freed = self.nbytes
            self._entries.clear()
            self.nbytes = 0
            return freed

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        for key in [k for k, e in self._entries.items() if e.used < cutoff]:
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes


def session_budget(configured: int | None, device_total: int) -> int:
    """The configured budget, else a share of the device's memory."""
    return configured if configured is not None else int(device_total * DEFAULT_SHARE)
