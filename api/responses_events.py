"""A Response's stream events, made from its job's events by a pure, deterministic translator: the
same job events always give the same numbered stream events, so a stream resumed with
`starting_after=N` replays the job's events through a fresh translator and skips what was sent."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from api.responses_types import (
    CANCELLED_CODE,
    ResponseHead,
    Status,
    call_item,
    item_id,
    message_item,
    output_text,
    reasoning_item,
    response_error,
    response_object,
    result_output,
    usage_of,
)
from shared.contract import JobResult
from shared.harmony import FINAL_CHANNEL
from shared.jobstore import events
from shared.jobstore.events import JobEvent
from shared.tools import parse_call_channel

StreamEvent = dict[str, Any]
"""One Responses stream event (its `type`, `sequence_number` and fields), as OpenAI's JSON."""


@dataclass
class _Item:
    """The output item being streamed."""

    kind: str
    channel: str
    index: int
    id: str
    text: list[str] = field(default_factory=list)
    call: tuple[str, str] | None = None  # (call id, function name) of a function call

    def whole(self, status: str) -> dict[str, Any]:
        text = "".join(self.text)
        if self.call is not None:
            return call_item(self.id, self.call[0], self.call[1], text, status)
        if self.kind == "reasoning":
            return reasoning_item(self.id, text, status)
        return message_item(self.id, text, status)


class ResponseEvents:
    """Turns one job's events (one consistent run, as `follow` relays them) into the Response's
    stream events, numbered from 0. `count_tokens` counts the reasoning's tokens for usage."""

    def __init__(self, head: ResponseHead, count_tokens: Callable[[str], int]):
        self.head = head
        self._count = count_tokens
        self._seq = 0
        self._items: list[dict[str, Any]] = []
        self._open: _Item | None = None
        self._started = False
        self.ended = False

    def opening(self) -> list[StreamEvent]:
        """`response.created`: queued for a background response, else in progress."""
        status: Status = "queued" if self.head.echo.get("background") else "in_progress"
        return [self._event("response.created", response=response_object(self.head, status))]

    def feed(self, event: JobEvent) -> list[StreamEvent]:
        """The stream events for one of the job's events."""
        if self.ended:
            return []
        if event.kind == events.START:
            return self._start()
        if event.kind == events.TOKEN:
            return [
                *self._start(),
                *self._token(str(event.data.get("channel")), str(event.data.get("text", ""))),
            ]
        if event.kind == events.DONE:
            return self._done(JobResult.model_validate(event.data), event.data.get("timings") or {})
        if event.kind == events.ERROR:
            return self._error(str(event.data.get("code")), str(event.data.get("message")))
        return []

    def _start(self) -> list[StreamEvent]:
        if self._started:
            return []
        self._started = True
        return [self._event("response.in_progress", response=response_object(self.head, "in_progress"))]

    def _token(self, channel: str, text: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if self._open is not None and self._open.channel != channel:
            out += self._close("completed")
        if self._open is None:
            out += self._begin(channel)
        item = self._open
        assert item is not None
        if not text:
            return out
        item.text.append(text)
        where = {"item_id": item.id, "output_index": item.index}
        if item.call is not None:
            return [*out, self._event("response.function_call_arguments.delta", **where, delta=text)]
        if item.kind == "reasoning":
            return [*out, self._event("response.reasoning_text.delta", **where, content_index=0, delta=text)]
        return [*out, self._event("response.output_text.delta", **where, content_index=0, delta=text,
                                  logprobs=[])]  # fmt: skip

    def _begin(self, channel: str) -> list[StreamEvent]:
        parsed = parse_call_channel(channel)
        kind = "function_call" if parsed else "message" if channel == FINAL_CHANNEL else "reasoning"
        index = len(self._items)
        item = _Item(kind, channel, index, item_id(self.head.id, kind, index))
        if parsed is not None:
            item.call = (parsed[1], parsed[2])
        self._open = item
        added = item.whole("in_progress")
        if kind != "function_call":
            added["content"] = []
        out = [self._event("response.output_item.added", output_index=index, item=added)]
        if kind != "function_call":
            part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else output_text("")
            out.append(self._part("added", item, part))
        return out

    def _close(self, status: str) -> list[StreamEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        whole, text = item.whole(status), "".join(item.text)
        self._items.append(whole)
        where = {"item_id": item.id, "output_index": item.index}
        if item.call is not None:
            out = [self._event("response.function_call_arguments.done", **where, name=item.call[1],
                               arguments=text)]  # fmt: skip
        elif item.kind == "reasoning":
            out = [self._event("response.reasoning_text.done", **where, content_index=0, text=text),
                   self._part("done", item, whole["content"][0])]  # fmt: skip
        else:
            out = [self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                   self._part("done", item, whole["content"][0])]  # fmt: skip
        return [*out, self._event("response.output_item.done", output_index=item.index, item=whole)]

    def _part(self, stage: str, item: _Item, part: dict[str, Any]) -> StreamEvent:
        return self._event(f"response.content_part.{stage}", item_id=item.id, output_index=item.index,
                           content_index=0, part=part)  # fmt: skip

    def _done(self, result: JobResult, timings: dict[str, Any]) -> list[StreamEvent]:
        cut = result.finish_reason == "length"
        out = [*self._start(), *self._close("incomplete" if cut else "completed")]
        status: Status = "incomplete" if cut else "completed"
        # A job whose events were not streamed (its stream expired): the output of its result.
        output = self._items or result_output(self.head.id, result, status)
        usage = usage_of(result.usage, self._count(result.reasoning or ""))
        response = response_object(self.head, status, output, usage, completed_at=timings.get("finished"))
        self.ended = True
        return [*out, self._event(f"response.{status}", response=response)]

    def _error(self, code: str, message: str) -> list[StreamEvent]:
        out = self._close("incomplete")
        # The SDK knows no `response.cancelled` event: a cancelled response ends `response.failed`,
        # its status `cancelled`.
        status: Status = "cancelled" if code == CANCELLED_CODE else "failed"
        error = response_error(code, message) if status == "failed" else None
        response = response_object(self.head, status, self._items, error=error)
        self.ended = True
        return [*out, self._event("response.failed", response=response)]

    def _event(self, kind: str, **fields: Any) -> StreamEvent:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event


def translate(
    translator: ResponseEvents, job_events: Iterable[JobEvent | None], after: int = -1
) -> Iterator[StreamEvent | None]:
    """The stream events of `job_events` after sequence number `after` (all with -1), with None
    wherever the job's events have None (an idle block: a chance to send a keep-alive)."""
    yield from (e for e in translator.opening() if e["sequence_number"] > after)
    for job_event in job_events:
        if job_event is None:
            yield None
            continue
        yield from (e for e in translator.feed(job_event) if e["sequence_number"] > after)
        if translator.ended:
            return


def sse(event: StreamEvent) -> str:
    """One Server-Sent Event of a Response stream: its type as the event name."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
