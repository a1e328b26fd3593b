"""What a worker's session holds of each job it started: its RQ records and run, and then either its row
(a slot) or its place behind an identical request being decoded (a follower)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue

from shared.contract import JobRequest
from workers.batch import Row
from workers.run import JobRun
from workers.sampling import sampler_for


@dataclass
class Started:
    """A job the session started: its RQ records and its run."""

    job: Job
    queue: Queue
    execution: Execution
    run: JobRun
    began: float
    """When it started (monotonic seconds): its timeout counts from here."""


@dataclass
class Slot(Started):
    """A started job decoding as a row of the session."""

    row: Row
    session: str | None = None
    """Its tenant's session (see workers/turns.py), whose cache it leaves when it ends."""
    keep: Callable[[], None] | None = None
    """Keeps its session's KV cache for the next turn, once the job is settled."""


@dataclass
class Follower(Started):
    """A started job that decodes nothing: identical to one the session is decoding (the same
    response-cache fingerprint), it takes that job's result when it finishes; should that job fail
    or be cancelled, it decodes itself."""

    request: JobRequest
    prompt_ids: list[int]


class Followers:
    """The followers of a session, by the fingerprint they share with the row they wait on."""

    def __init__(self) -> None:
        self._by_fingerprint: dict[str, list[Follower]] = {}

    def __len__(self) -> int:
        return sum(len(group) for group in self._by_fingerprint.values())

    def add(self, fingerprint: str, follower: Follower) -> None:
        """`follower` waits on the row decoding `fingerprint`."""
        self._by_fingerprint.setdefault(fingerprint, []).append(follower)

    def take(self, fingerprint: str) -> list[Follower]:
        """Every follower of `fingerprint` (its row ended), no longer waiting."""
        return self._by_fingerprint.pop(fingerprint, [])

    def remove(self, fingerprint: str, follower: Follower) -> None:
        """`follower` no longer waits (it was cancelled)."""
        group = [f for f in self._by_fingerprint.get(fingerprint, []) if f is not follower]
        if group:
            self._by_fingerprint[fingerprint] = group
        else:
            self._by_fingerprint.pop(fingerprint, None)

    def all(self) -> list[Follower]:
        """Every follower, whatever it waits on."""
        return [f for group in self._by_fingerprint.values() for f in group]


def read_job(job: Job, runtime: Any) -> tuple[JobRequest | None, list[int] | None, Exception | None]:
    """The job's request and its prompt's token ids (rendered once, by `runtime`), or why it cannot
    run: it still starts, and fails at once."""
    try:
        request = JobRequest.model_validate(job.args[0])
    except Exception as exc:
        return None, None, exc
    try:
        return request, runtime.prompt_ids(request), None
    except Exception as exc:
        return request, None, exc


def request_row(
    key: str, runtime: Any, request: JobRequest, completion: Any, device: Any, prefix: Any = None
) -> Row:
    """The batch row of `request` (its `completion`, its sampler); for `n` > 1, with the maker of its
    other choices, each its own completion and sampler, decoding beside it under the same key."""
    row = Row(key, completion, sampler_for(request, device, completion.constraint), prefix=prefix,
              request=request, choices=request.n)  # fmt: skip

    def spawn(choice: int) -> Row:
        other = runtime.completion(request, prompt_ids=completion.prompt_ids)
        sampler = sampler_for(request, device, other.constraint, choice)
        return Row(key, other, sampler, request=request, parent=row)

    row.spawn = spawn if request.n > 1 else None
    return row
