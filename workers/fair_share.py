"""Fair shares of a worker's batch slots between tenants, as pure functions over plain data.

Each tenant holding a row or waiting is due `size x its weight / the sum of their weights` of the
batch's `size` slots. A tenant under its share may join a full batch, up to `row_limit(size)` rows
(the KV budget still decides whether a row fits), while a tenant at or over its share takes no
more while another waits; free slots go to anyone, so one tenant alone fills the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping

DEFAULT_WEIGHT = 1.0
"""The weight of a tenant the settings do not name."""


def row_limit(size: int) -> int:
    """Most rows a batch of `size` holds with tenants under their share joining a full batch: a
    quarter more (at least one), none beyond `size` when batching is off (size 1)."""
    return size + max(1, size // 4) if size > 1 else size


def shares(
    holding: Iterable[str], waiting: Collection[str], weights: Mapping[str, float], size: int
) -> dict[str, float]:
    """Each tenant's fair share of `size` slots: the tenants holding rows (`holding`: the tenant of
    each) or with a job `waiting`, in proportion to their weights."""
    present = set(holding) | set(waiting)
    total = sum(weights.get(t, DEFAULT_WEIGHT) for t in present)
    return {t: size * weights.get(t, DEFAULT_WEIGHT) / total for t in present}


def at_share(
    holding: Iterable[str], waiting: Collection[str], weights: Mapping[str, float], size: int
) -> set[str]:
    """The tenants holding (`holding`: the tenant of each row) at least their fair share of `size`
    slots: they take no more while a tenant under its share waits."""
    held = Counter(holding)
    return {t for t, share in shares(held, waiting, weights, size).items() if held[t] >= share}
