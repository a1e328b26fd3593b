"""Fair shares of a worker's batch slots between tenants, as pure functions over plain data.

Each tenant holding a row or waiting is due `size x its weight / the sum of their weights` of the
batch's `size` slots. A tenant under its share may join a full batch, up to `row_limit(size)` rows
(the KV budget still decides whether a row fits), while a tenant at or over its share takes no
more while another waits; free slots go to anyone, so one tenant alone fills the batch.

A batch's lines (priority `batch`) are a class apart: they join only a free slot and hold at most
`size - reserved` rows, and their rows count against no interactive limit, so an interactive job
joins a batch full of them at once (the batch then runs wider than `size` until they end).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence

from shared import keys
from shared.contract import JobRequest

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


def reserved_rows(size: int, configured: int | None) -> int:
    """Slots of a batch of `size` that a batch's lines never take: as `configured` (at most
    `size - 1`, so they still run), else a quarter (at least one); none without batching (size 1)."""
    if size <= 1:
        return 0
    return min(configured if configured is not None else max(1, size // 4), size - 1)


def joinable(interactive_rows: int, batch_rows: int, size: int, reserved: int) -> tuple[bool, bool]:
    """Whether an interactive job, and whether a batch's line, may join a batch of `size` holding
    these rows: interactive up to `row_limit(size)` interactive rows, whatever the batch's lines
    hold; a line only into a free slot, while lines hold fewer than `size - reserved` rows."""
    interactive = interactive_rows < row_limit(size)
    batch = batch_rows < size - reserved and interactive_rows + batch_rows < size
    return interactive, batch


def kv_beside(worst: int, request: JobRequest | None, line: bool, reserved: int) -> list[int]:
    """The worst cases (tokens) a new job's row of `worst` must leave room for in the KV budget beside
    it: its other choices, and for a batch's `line` the `reserved` rows, as long as its own."""
    return [worst] * ((request.n if request else 1) - 1 + (reserved if line else 0))


def first_queues(queues: Sequence[str], size: int, reserved: int) -> list[str]:
    """The queues an idle worker takes its first job from: `joinable`'s rule for an empty batch
    (a line may start one unless every slot is reserved)."""
    _, line = joinable(0, 0, size, reserved)
    return [q for q in queues if line or q not in keys.BATCH_QUEUES]
