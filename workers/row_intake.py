"""Which waiting jobs join a running batch, and from which queues: the Redis I/O around the decisions of
workers/fair_share.py. Interactive jobs come first (tenants under their fair share of the slots first,
and only they in a full batch); a batch's lines (priority `batch`) then fill free slots, never more
than `size - reserved` of them, and their rows count against no interactive limit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from redis import Redis
from rq.job import Job

from shared import keys
from shared.contract import JobRequest
from shared.jobstore import fair_queue, runs
from shared.jobstore.record import JobRecord
from workers import fair_share
from workers.kv_budget import KvBudget
from workers.slots import Started


@dataclass(frozen=True)
class Holder:
    """A job the batch holds (a row, a follower, a promoted follower): its tenant, and whether it is
    a batch's line."""

    tenant: str
    line: bool

    @classmethod
    def of(cls, record: JobRecord) -> Holder:
        """The holder of a job of `record`."""
        return cls(record.tenant_or_default, record.priority == keys.BATCH_PRIORITY)


def holders(*groups: Iterable[Started]) -> list[Holder]:
    """The holders of the jobs of `groups` (a batch's rows, followers, promoted followers)."""
    return [Holder.of(held.run.record) for group in groups for held in group]


class RowIntake:
    """Takes the jobs that join a batch of `size` from the worker's `queues` (in the order served)."""

    def __init__(
        self,
        redis: Redis,
        worker: str,
        queues: Sequence[str],
        weights: Mapping[str, float],
        size: int,
        reserved: int,
    ):
        self._redis, self._worker, self._weights = redis, worker, weights
        self.size, self.reserved = size, reserved
        self._interactive = [q for q in queues if q not in keys.BATCH_QUEUES]
        self._lines = [q for q in queues if q in keys.BATCH_QUEUES]
        self.lines_full = False
        """A line did not fit the KV budget beside the reserved rows: no line joins until a row leaves."""

    def takes(
        self, holding: Callable[[], list[Holder]], room: Callable[[], bool]
    ) -> Iterator[tuple[Job, str]]:
        """The jobs to admit and their queues, one at a time while `room()` (the KV budget, memory,
        no stop); `holding()` is read again before each, so each admitted job counts."""
        waiting: set[str] | None = None
        while room():
            held = holding()
            tenants = [h.tenant for h in held if not h.line]
            interactive, line = fair_share.joinable(
                len(tenants), len(held) - len(tenants), self.size, self.reserved
            )
            taken = None
            if interactive:
                if waiting is None:  # read once a look: a tenant's jobs are taken in one look anyway
                    waiting = fair_queue.waiting_tenants(self._redis, self._interactive)
                taken = self._take_interactive(tenants, waiting)
            if taken is None and line and self._lines and not self.lines_full:
                taken = self._take(self._lines)
            if taken is None:
                return
            yield taken

    def fits(
        self, budget: KvBudget, lengths: list[int], worst: int, request: JobRequest | None, line: bool
    ) -> bool:
        """Whether a job's row of `worst` tokens (prompt + max_tokens) fits `budget` beside rows of
        `lengths`, a batch's `line` leaving room for the reserved rows; one that does not closes the
        intake to lines until a row leaves (`lines_full`)."""
        fits = budget.admits(lengths + fair_share.kv_beside(worst, request, line, self.reserved), worst)
        self.lines_full = self.lines_full or not fits
        return fits

    def _take_interactive(self, tenants: list[str], waiting: set[str]) -> tuple[Job, str] | None:
        """An interactive job of a tenant under its share; in a free slot (fewer than `size` interactive
        rows: the lines' rows do not count) anyone's."""
        if not waiting:
            return None
        skip = fair_share.at_share(tenants, waiting, self._weights, self.size)
        taken = self._take(self._interactive, skip) if waiting - skip else None
        if taken is None and skip and len(tenants) < self.size:
            taken = self._take(self._interactive)
        return taken

    def _take(self, queues: list[str], skip: set[str] | None = None) -> tuple[Job, str] | None:
        return runs.take(self._redis, self._worker, queues, weights=self._weights, skip_tenants=skip or ())
