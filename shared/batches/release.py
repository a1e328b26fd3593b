"""How many lines of each batch the feeder releases in one round: a pure decision over the jobs in
flight and waiting, so a batch never floods the queues (a few jobs wait at a time, released as the
workers take them), no tenant's batches hold more than their share, and tenants take turns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caps:
    """The bounds on batch jobs (settings `batch_*`)."""

    in_flight: int
    """Batch jobs released and not settled, all tenants together."""
    tenant_in_flight: int
    """Batch jobs of one tenant released and not settled (its batch quota)."""
    waiting: int
    """Batch jobs waiting for a worker (not started), all together: what the queues ever hold."""


@dataclass(frozen=True)
class BatchLoad:
    """One running batch as the decision sees it."""

    key: str
    tenant: str
    in_flight: int
    remaining: int
    """Lines not claimed yet."""


def release_plan(batches: list[BatchLoad], waiting: int, caps: Caps, turn: int = 0) -> dict[str, int]:
    """Lines to release now per batch key: as many as the caps leave room for, one at a time to
    each tenant in turn (starting with the `turn`-th, so a small room rotates between tenants),
    within a tenant to its oldest batch first (`batches` in creation order)."""
    in_flight = sum(b.in_flight for b in batches)
    room = min(caps.in_flight - in_flight, caps.waiting - waiting)
    tenants: dict[str, list[BatchLoad]] = {}
    for batch in batches:
        tenants.setdefault(batch.tenant, []).append(batch)
    tenant_room = {t: caps.tenant_in_flight - sum(b.in_flight for b in bs) for t, bs in tenants.items()}
    left = {b.key: b.remaining for b in batches}
    plan: dict[str, int] = {}
    order = list(tenants)
    if order:
        shift = turn % len(order)
        order = order[shift:] + order[:shift]
    while room > 0:
        gave = False
        for tenant in order:
            if room <= 0 or tenant_room[tenant] <= 0:
                continue
            oldest = next((b for b in tenants[tenant] if left[b.key] > 0), None)
            if oldest is None:
                continue
            plan[oldest.key] = plan.get(oldest.key, 0) + 1
            left[oldest.key] -= 1
            tenant_room[tenant] -= 1
            room -= 1
            gave = True
        if not gave:
            break
    return plan
