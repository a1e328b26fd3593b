"""Which joining rows prefill together. Rows prefilled in one forward pass are left-padded to the
longest, and every padding column is computed like a real token: a 30-token prompt joining with a
2,000-token one would cost 2,000 columns and wait for the long one's first token. So rows are
prefilled shortest first, in groups whose padding stays within PADDING_SLACK of their real tokens:
equal prompts still share one pass (the burst of 16 equal requests is one prefill), and a short
prompt's first token goes out before a long prompt's prefill starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

PADDING_SLACK = 0.25
"""Most padding a group may compute, as a share of its real tokens."""

Item = TypeVar("Item")


def prefill_groups(items: Sequence[Item], lengths: Sequence[int]) -> list[list[Item]]:
    """`items` (each `lengths[i]` tokens to prefill) in groups to prefill one after another, shortest
    first; a group pads its rows to its longest, at most PADDING_SLACK of its real tokens."""
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        if group is not None:
            real = sum(lengths[i] for i in group) + lengths[index]
            padded = lengths[index] * (len(group) + 1)  # sorted: this row is the group's longest
            if padded <= real * (1 + PADDING_SLACK):
                group.append(index)
                continue
        groups.append([index])
    return [[items[i] for i in group] for group in groups]
