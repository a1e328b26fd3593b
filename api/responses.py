"""OpenAI's Responses API on the same jobs: `POST /v1/responses` (sync, streamed, or `background`),
`GET /v1/responses/{id}` (poll, or replay its stream `starting_after` a sequence number), `POST
/v1/responses/{id}/cancel`, `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`.

A response is one job through `api.submission.submit`; its id is the job's id. The request echo and
the conversation are stored per tenant (`api.response_store`) so a poll can show the whole Response
and `previous_response_id` can continue it, on the chain's session KV cache."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from api.active import set_aside
from api.body import read_json
from api.completions import CLIENT_CLOSED, JOB_ID_HEADER, cancel_abandoned, wait_result
from api.disconnect import client_socket, gone
from api.following import ClientGone, follow
from api.jobs import cancel_job, find_job, job_view
from api.response_store import ResponseStore, StoredResponse
from api.responses_events import ResponseEvents, sse, translate
from api.responses_types import (
    ResponseHead,
    ResponseNotFound,
    ResponseRequest,
    ResponseRequestError,
    answer_messages,
    finished_response,
    view_response,
)
from api.services import services
from api.submission import prompt_tokenizer, submit, webhooks
from api.tenancy import current_tenant
from shared.contract import TERMINAL_STATUSES, JobResult, JobStatus
from shared.errors import JobEnded, UnsupportedParameter, ValidationFailed
from shared.jobstore import events
from shared.json_body import parse_body
from shared.registry import model_spec

bp = Blueprint("responses", __name__, url_prefix="/v1/responses")

CANCEL_WAIT_S = 30.0
"""Seconds a cancel waits for a running job to stop (at its next decode step) before answering."""

ITEMS_LIMIT, ITEMS_LIMIT_MAX = 20, 100
"""Input items per page by default, and at most."""

INPUT_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.post("")
def create() -> Response:
    """Create a response: answered when done, streamed (`stream`), or at once (`background`)."""
    body = read_json()
    params = parse_body(body, ResponseRequest)
    tenant, store = current_tenant(), _store()
    history, session_id = [], None
    if params.previous_response_id is not None:
        previous = store.load(tenant, params.previous_response_id)
        history = [*previous.conversation, *answer_messages(_finished(previous))]
        session_id = previous.session_id
    history += params.new_messages()
    if session_id is None and params.store:  # a follow-up may come: its turn reuses this KV
        session_id = f"resp-{uuid.uuid4().hex}"
    held = services()
    if params.stream:
        held.streams.take(tenant)  # before the job exists: a refused request leaves nothing behind
    try:
        submitted = submit(params.submission(history, session_id), "/v1/responses", body)
        head = ResponseHead(id=submitted.job_id, created_at=int(time.time()), model=submitted.model,
                            echo=params.echo())  # fmt: skip
        if submitted.replayed:  # a repeated Idempotency-Key: the response it created
            head = _stored_or(store, tenant, head)
        elif params.store:
            store.save(tenant, StoredResponse(head=head, input_items=_input_items(head.id, body["input"]),
                                              conversation=history, session_id=session_id or ""))  # fmt: skip
        response = _answer(params, head)
    except BaseException:
        if params.stream:
            held.streams.give(tenant)
        raise
    if params.stream:
        response.call_on_close(lambda: held.streams.give(tenant))
    response.headers[JOB_ID_HEADER] = head.id
    return response


@bp.get("/<response_id>")
def show(response_id: str) -> Response:
    """The response as it stands; with `stream=true`, its events (after `starting_after`), live
    until it ends."""
    stored = _store().load(current_tenant(), response_id)
    job = find_job(response_id)
    args = request.args
    _refuse_args(("include", "include[]"))
    if args.get("include_obfuscation") == "true":  # this server pads no stream events
        raise UnsupportedParameter("`include_obfuscation` is not supported by this server: send false.")
    if _flag("stream"):
        after = _integer("starting_after", -1)
        tenant, held = current_tenant(), services()
        held.streams.take(tenant)
        response = _stream(stored.head, after, cancel_on_leave=False)
        response.call_on_close(lambda: held.streams.give(tenant))
    else:
        if "starting_after" in args:
            raise ValidationFailed("`starting_after` applies to a streamed retrieve (`stream=true`).")
        response = jsonify(view_response(stored.head, job_view(job), _reasoning_tokens(stored.head.model)))
    response.headers[JOB_ID_HEADER] = response_id
    return response


@bp.post("/<response_id>/cancel")
def cancel(response_id: str) -> Response:
    """Cancel a background response, queued or running; answers it `cancelled`."""
    stored = _store().load(current_tenant(), response_id)
    if not stored.head.echo.get("background"):
        raise ResponseRequestError("Only a response created with `background: true` can be cancelled.")
    job = find_job(response_id)
    view = job_view(job)
    if view.status in TERMINAL_STATUSES - {JobStatus.CANCELLED}:
        raise JobEnded(f"The response `{response_id}` already ended; there is nothing to cancel.")
    if view.status is not JobStatus.CANCELLED and not cancel_job(
        services().redis, job, "Cancelled by the client.", webhooks()
    ):
        _await_end(response_id)
    count = _reasoning_tokens(stored.head.model)
    response = jsonify(view_response(stored.head, job_view(find_job(response_id)), count))
    response.headers[JOB_ID_HEADER] = response_id
    return response


@bp.delete("/<response_id>")
def delete(response_id: str) -> Response:
    """Forget a stored response (its job stays under /v1/jobs until it expires)."""
    if not _store().delete(current_tenant(), response_id):
        raise ResponseNotFound(f"No response with id `{response_id}` was found.")
    return jsonify({"id": response_id, "object": "response.deleted", "deleted": True})


@bp.get("/<response_id>/input_items")
def input_items(response_id: str) -> Response:
    """The response's input items, a page at a time (`order` desc by default, as OpenAI)."""
    items = _store().load(current_tenant(), response_id).input_items
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ValidationFailed("order must be `asc` or `desc`.")
    limit = _integer("limit", ITEMS_LIMIT)
    if not 1 <= limit <= ITEMS_LIMIT_MAX:
        raise ValidationFailed(f"limit must be an integer from 1 to {ITEMS_LIMIT_MAX}.")
    items = items if order == "asc" else items[::-1]
    after = request.args.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ValidationFailed("after must be an item id from an earlier page.")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return jsonify({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})  # fmt: skip


def _answer(params: ResponseRequest, head: ResponseHead) -> Response:
    if params.stream:
        return _stream(head, -1, cancel_on_leave=not params.background)
    if params.background:
        return jsonify(view_response(head, job_view(find_job(head.id)), _reasoning_tokens(head.model)))
    held, sock = services(), client_socket(request.environ)
    try:
        with set_aside():  # waiting for the job is no work: it holds no slot
            result = wait_result(held.stream_redis, held.hub, head.id, lambda: gone(sock))
    except ClientGone:
        cancel_abandoned(held.stream_redis, head.id, webhooks())
        return Response(status=CLIENT_CLOSED)
    finished = job_view(find_job(head.id)).timestamps.finished
    return jsonify(
        finished_response(head, result, _reasoning_tokens(head.model)(result.reasoning or ""), finished)
    )


def _stream(head: ResponseHead, after: int, cancel_on_leave: bool) -> Response:
    """The response's stream events after sequence number `after`. A client that leaves a
    non-background stream cancels its job (as chat completions do); a background job runs on."""
    held, sock, sender = services(), client_socket(request.environ), webhooks()
    translator = ResponseEvents(head, _reasoning_tokens(head.model))

    def relay() -> Iterator[str]:
        job_events = follow(held.stream_redis, held.hub, head.id, lambda: gone(sock))
        try:
            for event in translate(translator, job_events, after):
                yield ": keep-alive\n\n" if event is None else sse(event)
        except ClientGone:
            pass
        finally:
            if cancel_on_leave and not translator.ended:
                cancel_abandoned(held.stream_redis, head.id, sender)

    return Response(stream_with_context(relay()), mimetype="text/event-stream", headers=STREAM_HEADERS)


def _await_end(job_id: str) -> None:
    """Wait (up to CANCEL_WAIT_S) for a cancelled running job's last event."""
    held = services()
    deadline = time.monotonic() + CANCEL_WAIT_S
    try:
        with set_aside():
            for event in follow(held.stream_redis, held.hub, job_id, lambda: time.monotonic() > deadline,
                                relay=False):  # fmt: skip
                if event is not None and event.kind in events.ENDINGS:
                    return
    except ClientGone:  # not stopped yet: the answer shows it still in progress
        return


def _finished(previous: StoredResponse) -> JobResult:
    """The result a follow-up continues from (400 while the previous response has none)."""
    view = job_view(find_job(previous.head.id))
    if view.result is None:
        raise ResponseRequestError(
            f"The previous response `{previous.head.id}` is `{view.status.value}`: a follow-up continues "
            "only a finished response."
        )
    return view.result


def _stored_or(store: ResponseStore, tenant: str, head: ResponseHead) -> ResponseHead:
    try:
        return store.load(tenant, head.id).head
    except ResponseNotFound:
        return head


def _input_items(response_id: str, given: Any) -> list[dict[str, Any]]:
    """The input as items with ids, as `GET .../input_items` lists them."""
    raw = [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else given
    items = []
    for index, item in enumerate(raw):
        kind = item.get("type", "message")
        item = {"type": kind, **item}
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        item.setdefault("id", f"{INPUT_ID_PREFIX.get(kind, 'item')}_{response_id}_in{index}")
        item.setdefault("status", "completed")
        items.append(item)
    return items


def _reasoning_tokens(model: str) -> Callable[[str], int]:
    """Counts a reasoning text's tokens with the model's tokenizer (0 while it is not prepared)."""
    tokenizer = prompt_tokenizer(model_spec(model), on="request")

    def count(text: str) -> int:
        # Harmony's and Hugging Face's tokenizers both `encode` text to ids; only harmony models
        # (HarmonyChat) have a reasoning channel, and its `encode` adds no special tokens.
        return len(tokenizer.encode(text)) if text and tokenizer is not None else 0

    return count


def _store() -> ResponseStore:
    extensions = current_app.extensions
    if "gptoss_responses" not in extensions:
        extensions["gptoss_responses"] = ResponseStore(services().redis, services().settings.result_ttl)
    return extensions["gptoss_responses"]


def _flag(name: str) -> bool:
    value = request.args.get(name, "false")
    if value not in ("true", "false"):
        raise ValidationFailed(f"{name} must be `true` or `false`.")
    return value == "true"


def _integer(name: str, default: int) -> int:
    given = request.args.get(name)
    if given is None:
        return default
    if not (given.isascii() and given.isdigit() and len(given) <= 9):
        raise ValidationFailed(f"{name} must be a non-negative integer.")
    return int(given)


def _refuse_args(names: tuple[str, ...]) -> None:
    for name in names:
        if name in request.args:
            raise UnsupportedParameter(f"`{name}` is not supported by this server: leave it unset.")
