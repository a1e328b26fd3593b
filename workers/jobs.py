"""The RQ job functions, reached by dotted name (`workers.jobs.generate`)."""

from __future__ import annotations

from typing import Any


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """The function every generation job is enqueued under (`keys.GENERATE_FUNC`). A gptoss worker
    never calls it: it runs each such job in its session (workers/session.py), beside the others.
    Anything else that would run it (RQ's own `perform_job`, a plain `rq worker`) fails the job."""
    raise RuntimeError("generation jobs run only in a `gptoss worker` session, not through RQ's perform_job")
