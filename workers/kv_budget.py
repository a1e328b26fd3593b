"""The KV cache budget of a batch: bytes one token's keys and values take, and whether one more
request fits. Pure decisions over plain numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_SHARE = 0.25
"""Share of the device's memory the KV cache may take when no budget is configured."""


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of keys and values one token takes across all layers."""
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def model_kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """`kv_bytes_per_token` from a transformers config (full attention on every layer, as the
    batch's cache keeps it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return kv_bytes_per_token(text.num_hidden_layers, kv_heads, head_dim, dtype_bytes)


def budget_bytes(configured: int | None, device_total: int) -> int:
    """The configured budget, else a share of the device's memory."""
    return configured if configured is not None else int(device_total * DEFAULT_SHARE)


@dataclass(frozen=True)
class KvBudget:
    """How much KV cache a worker's batch may hold.

    The batch keeps one left-padded cache, so it holds rows × its longest row: admission counts
    every row at the longest worst case (prompt + max_tokens) among them and the newcomer.
    """

    bytes_per_token: int
    budget: int

    def worst_case(self, lengths: list[int]) -> int:
        """Bytes the batch may reach with rows whose prompt + max_tokens are `lengths`."""
        return len(lengths) * max(lengths, default=0) * self.bytes_per_token

    def admits(self, lengths: list[int], new: int) -> bool:
        """One more request of `new` tokens (prompt + max_tokens) fits beside rows of `lengths`.
        A request alone is always admitted: it would run alone anyway, bounded by the context."""
        return not lengths or self.worst_case([*lengths, new]) <= self.budget
