"""bf16 weights on a CPU without native bf16 (no AVX512-BF16, no AMX).

There, torch emulates bf16 matmuls through float32: a decode step of one row is still fastest in
bf16 (half the bytes to read: SmolLM2-135M, 2 AVX2 cores, ~32 ms against ~60 ms in float32), but a
step of 16 rows is ~2.5x slower than in float32 (~260 ms against ~110 ms); the crossing lies
between 4 and 8 rows. A batching worker there computes in float32 and keeps a bf16 copy of every
linear layer's weights for the steps of few rows: each step takes the faster path for its size, at
the cost of holding the weights twice (float32 and bf16)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = 4
"""Rows (tokens in one forward) at or below which a linear layer multiplies in bf16."""


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class DualLinear(nn.Module):
    """A linear layer holding its weights in float32 and in bf16: inputs of at most `small_rows`
    rows multiply in bf16 (the result cast back), larger ones in float32."""

    def __init__(self, linear: nn.Linear, small_rows: int = SMALL_ROWS):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.small_rows = small_rows
        self.weight, self.bias = linear.weight, linear.bias  # shared, so tied weights stay tied
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias_bf16", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.small_rows * self.in_features:
            return F.linear(x.to(torch.bfloat16), self.weight_bf16, self.bias_bf16).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def add_bf16_path(model: Any, small_rows: int = SMALL_ROWS) -> int:
    """Make every linear layer of float32 `model` a DualLinear; the number replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, DualLinear(child, small_rows))
                replaced += 1
    return replaced
