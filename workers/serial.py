"""Rows decoded one at a time, each to its end in one step: how a session runs its rows on a model that
cannot share decode steps (tensor parallel: every rank must run the same steps, and requests are
relayed one by one), so such a worker's jobs take the same session path as a batch's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from shared.contract import JobRequest
from workers.batch import Row
from workers.completion import Completion
from workers.sessions import Layers


class CompletesAlone(Protocol):
    """What a serial decoder needs of the model runtime (workers/runtime.ModelRuntime)."""

    device: str

    def complete(
        self, request: JobRequest, completion: Completion, cancelled: Callable[[], bool] | None = None
    ) -> bool: ...


class SerialDecoder:
    """A Decoder (workers/batch.py) whose `step` decodes its first unfinished row to the end alone.

    A failure in a row's generation stays with the row, as in a batch. No KV cache outlives a step,
    so a row leaves nothing for its session's next turn.
    """

    def __init__(self, runtime: CompletesAlone):
        self._runtime = runtime
        self.device = runtime.device
        self.rows: list[Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """No cache is held between steps."""
        return 0

    def join(self, rows: list[Row]) -> None:
        """Queue `rows`; each decodes in a later step, in order."""
        self.rows.extend(rows)

    def step(self) -> None:
        """Decode the first row that has not ended, to its end."""
        row = next((r for r in self.rows if not r.completion.ended and r.error is None), None)
        if row is None:
            return
        if row.request is None:
            row.error = ValueError(f"row {row.key} has no request to decode alone")
            return
        try:
            self._runtime.complete(row.request, row.completion)
        except Exception as exc:  # this row fails alone; the session settles it like a batch row's
            row.error = exc

    def drop(self, keys: set[str]) -> list[Row]:
        """Take the rows of `keys` out; the rows taken out."""
        gone = [r for r in self.rows if r.key in keys]
        self.rows = [r for r in self.rows if r.key not in keys]
        return gone

    def row_state(self, key: str) -> tuple[list[int], Layers] | None:
        """None: the cache of a row decoded alone is gone once it ends."""
        return None
