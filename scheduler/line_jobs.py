"""A batch line and its job: the line made a job exactly as its endpoint would make it (the API's
request models and shared.preparation's decisions), and the line an ended job writes (the
endpoint's answer, its error answer, or OpenAI's `error` form for a line the batch stopped)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from redis import Redis

from scheduler.tokens import PromptCounter
from shared.batches import lines as batch_lines
from shared.batches.ledger import BatchLedger, Settled
from shared.batches.records import StoredBatch
from shared.contract import JobStatus
from shared.errors import GptossError
from shared.jobstore import lifecycle
from shared.jobstore.record import JobRecord
from shared.jobstore.views import build_view
from shared.normalise import canonical
from shared.openai.batch_lines import line_answer, line_error, line_submission
from shared.preparation import prepare
from shared.prompts import ModelNotPrepared
from shared.registry import ModelSpec
from shared.retention import remember
from shared.settings import Settings

STOPPED_CODES = {"expire": "batch_expired", "cancel": "batch_cancelled"}
"""The error code of a line a stopping batch did not let finish."""


def custom_id_of(raw: list[str]) -> str:
    """The custom_id of an input line (as uploaded, checked then), or '' when the line is gone."""
    return str(json.loads(raw[0]).get("custom_id", "")) if raw else ""


def stopped_message(stopping: str) -> str:
    """Why a line of a stopping batch (`expire` or `cancel`) did not finish."""
    if stopping == "expire":
        return "The batch's completion window ended before this request finished."
    return "The batch was cancelled before this request finished."


class LineJobs:
    """Makes batch lines jobs and reads their endings (the feeder's two ends of a line)."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        counter: PromptCounter,
        ledger: BatchLedger,
        clock: Callable[[], float] = time.time,
    ):
        self._settings, self._redis, self._counter = settings, redis, counter
        self._ledger, self._clock = ledger, clock

    def release(self, batch: StoredBatch, line: int, raw: str | None) -> tuple[str, str] | None:
        """Make claimed line `line` (its text `raw`) a job at batch priority, in the transaction that
        names it in the batch's open lines; or the error line and code it is refused with."""
        if raw is None:  # the input file expired or was deleted under the batch
            message = "The batch's input file no longer exists."
            return batch_lines.unrun_line("", "input_file_missing", message), "input_file_missing"
        entry = json.loads(raw)
        custom_id = str(entry["custom_id"])
        try:
            submission = canonical(line_submission(batch.endpoint, entry["body"]))
            payload, model, _, prompt_tokens = prepare(submission.request(), self._settings, self._tokenizer)
        except GptossError as exc:
            return batch_lines.failed_line(custom_id, None, exc.status, exc.to_dict()), exc.code
        now = self._clock()
        record = JobRecord(
            request_id=f"{batch.id}:{line + 1}",
            model=model,
            tenant=batch.tenant,
            priority="batch",  # keys.BATCH_PRIORITY, as the record's type spells it
            retention=self._settings.result_ttl,
            prompt_tokens=prompt_tokens,
        )
        record.stamp("received", now)
        record.carry_trace()  # the job's spans continue the batch's release span

        def released(pipe: Any, job_id: str) -> None:  # in the transaction that creates the job
            self._ledger.released(pipe, batch.tenant, batch.id, line, job_id, custom_id)
            remember(pipe, job_id, batch.tenant, now, record.retention)

        lifecycle.enqueue(
            self._redis,
            payload.model_dump(mode="json"),
            record,
            timeout=self._settings.job_timeout,
            description=f"generate {model} (batch)",
            also=released,
        )
        return None

    def ending(
        self, batch: StoredBatch, job_id: str, custom_id: str, job: Any, stopping: str
    ) -> tuple[str, Settled, str]:
        """The line an ended job writes, where (`completed`: the output file), and its metric label:
        the endpoint's answer; its error answer; or, stopped by the batch, OpenAI's `error` form."""
        if job is None:
            status, body = line_error("job_expired", "The line's job expired before its result was read.")
            return batch_lines.failed_line(custom_id, job_id, status, body), "failed", "failed"
        record = lifecycle.read(job)
        rq_status = job.get_status(refresh=False)
        result = job.return_value() if rq_status == "finished" else None
        view = build_view(job.id, record, rq_status, result)
        if view.status is JobStatus.FINISHED and view.result is not None:
            created = int(record.at("finished") or self._clock())
            body = line_answer(batch.endpoint, job_id, created, view.result)
            return batch_lines.output_line(custom_id, job_id, body), "completed", "completed"
        code = view.error.code if view.error else "job_failed"
        if stopping and code == "job_cancelled":  # stopped by the batch, not by its own fault
            text = batch_lines.unrun_line(custom_id, STOPPED_CODES[stopping], stopped_message(stopping))
            return text, "failed", "expired" if stopping == "expire" else "cancelled"
        message = view.error.message if view.error else "The job failed."
        status, body = line_error(code, message, rejected=view.status is JobStatus.REJECTED)
        return batch_lines.failed_line(custom_id, job_id, status, body), "failed", "failed"

    def _tokenizer(self, spec: ModelSpec) -> Any | None:
        try:
            return self._counter.tokenizer(spec)
        except ModelNotPrepared:
            return None
