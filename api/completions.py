"""OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

Each request becomes the same RQ job as `POST /v1/jobs` (through `api.submission.submit`); the API
then waits on the job's event stream and answers in OpenAI's format, or relays it as OpenAI's chunks
over Server-Sent Events with `stream: true`. A client that disconnects cancels its job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import structlog
from flask import Blueprint, Response, jsonify, request, stream_with_context
from pydantic import BaseModel
from redis import Redis

from api.active import set_aside
from api.body import read_json
from api.disconnect import client_socket, gone
from api.following import ClientGone, follow
from api.jobs import cancel_job
from api.services import services
from api.submission import submit, webhooks
from api.tenancy import current_tenant
from shared.contract import JobResult
from shared.errors import ModelNotFound
from shared.job_errors import job_error
from shared.jobstore import events, lifecycle
from shared.jobstore.hub import StreamHub
from shared.json_body import parse_body
from shared.openai.models import (
    ChatCompletionRequest,
    ChunkMaker,
    CompletionRequest,
    ModelCard,
    ModelList,
    chat_completion,
    text_completion,
)
from shared.registry import canonical_name, model_spec
from shared.webhooks import WebhookSender

bp = Blueprint("openai", __name__, url_prefix="/v1")
log = structlog.get_logger()

JOB_ID_HEADER = "X-Job-ID"
CLIENT_CLOSED = 499
"""Status logged for a request whose client left before the answer (nginx's convention)."""


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """A chat completion: the answer in `content`, gpt-oss's reasoning in `reasoning_content`."""
    body = read_json()
    chat = parse_body(body, ChatCompletionRequest)
    return _answer(chat, chat.submission(), "/v1/chat/completions", body, chat=True)


@bp.post("/completions")
def completions() -> Response:
    """A text completion of `prompt`."""
    body = read_json()
    completion = parse_body(body, CompletionRequest)
    return _answer(completion, completion.submission(), "/v1/completions", body, chat=False)


@bp.get("/models")
def models() -> Response:
    """The model this server serves (OpenAI clients pick a model from here)."""
    return jsonify(ModelList(data=[_card(services().settings.model)]).model_dump(mode="json"))


@bp.get("/models/<path:model>")
def model(model: str) -> Response:
    """One served model by name or alias (404 for any other)."""
    served = services().settings.model
    try:
        name = canonical_name(model)
    except Exception:
        name = model
    if name != served:
        raise ModelNotFound(f"The model `{model}` is not served here; this server serves `{served}`.")
    return jsonify(_card(served).model_dump(mode="json"))


def _card(name: str) -> ModelCard:
    spec = model_spec(name)
    return ModelCard(id=spec.name, created=0, context_length=spec.context_length)


def _answer(params: Any, submission: Any, route: str, body: Any, chat: bool) -> Response:
    held, tenant = services(), current_tenant()
    held.streams.take(tenant)  # before the job exists: a refused request leaves nothing behind
    try:
        response = _submit_and_answer(params, submission, route, body, chat)
    except BaseException:
        held.streams.give(tenant)
        raise
    if params.stream:
        response.call_on_close(lambda: held.streams.give(tenant))
    else:
        held.streams.give(tenant)
    return response


def _submit_and_answer(params: Any, submission: Any, route: str, body: Any, chat: bool) -> Response:
    submitted = submit(submission, route, body)
    redis, hub, sender = services().stream_redis, services().hub, webhooks()
    sock = client_socket(request.environ)
    created = int(time.time())
    headers = {JOB_ID_HEADER: submitted.job_id}
    if params.stream:
        maker = ChunkMaker(submitted.job_id, created, submitted.model, chat, params.include_usage())
        stream = _stream(redis, hub, submitted.job_id, maker, lambda: gone(sock), sender)
        headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(stream_with_context(stream), mimetype="text/event-stream", headers=headers)
    try:
        with set_aside():  # waiting for the job is no work: it holds no slot
            result = wait_result(redis, hub, submitted.job_id, lambda: gone(sock))
    except ClientGone:
        cancel_abandoned(redis, submitted.job_id, sender)
        return Response(status=CLIENT_CLOSED, headers=headers)
    answer = (chat_completion if chat else text_completion)(submitted.job_id, created, result)
    response = jsonify(answer.model_dump(mode="json", exclude_none=not chat))
    response.headers.update(headers)
    return response


def wait_result(redis: Redis, hub: StreamHub, job_id: str, client_gone: Any) -> JobResult:
    """The job's result once it is done; raises the job's error, or ClientGone."""
    for event in follow(redis, hub, job_id, client_gone, relay=False):
        if event is None:
            continue
        if event.kind == events.DONE:
            return JobResult.model_validate(event.data)
        if event.kind == events.ERROR:
            raise job_error(str(event.data.get("code")), str(event.data.get("message")))
    raise job_error("job_failed", "The job ended without a result.")


def _stream(
    redis: Redis, hub: StreamHub, job_id: str, maker: ChunkMaker, client_gone: Any, sender: WebhookSender
) -> Iterator[str]:
    """The response body of a streamed completion. Leaving early (the client closed the connection:
    a failed write closes this generator, or the socket is seen closed) cancels the job."""
    ended = False
    try:
        yield from (_data(chunk) for chunk in maker.opening())
        for event in follow(redis, hub, job_id, client_gone):
            if event is None:
                yield ": keep-alive\n\n"
            elif event.kind == events.TOKEN:
                data = event.data
                yield from (
                    _data(c) for c in maker.token(data["channel"], data["text"], data.get("logprobs"))
                )
            elif event.kind == events.DONE:
                ended = True
                yield from (_data(c) for c in maker.closing(JobResult.model_validate(event.data)))
                yield "data: [DONE]\n\n"
            elif event.kind == events.ERROR:
                ended = True
                error = job_error(str(event.data.get("code")), str(event.data.get("message")))
                yield f"data: {json.dumps(error.to_dict())}\n\n"
                yield "data: [DONE]\n\n"
    except ClientGone:
        pass
    finally:
        if not ended:
            cancel_abandoned(redis, job_id, sender)


def cancel_abandoned(redis: Redis, job_id: str, sender: WebhookSender) -> None:
    """Cancel the job of a client that left (a streamed or waiting answer nobody reads)."""
    log.info("client_disconnected", job_id=job_id)
    try:
        job = lifecycle.fetch(redis, job_id)
        if job is not None:
            cancel_job(redis, job, "Cancelled: the client closed the connection.", sender)
    except Exception:  # the client is gone; nothing to answer, only to log
        log.exception("cancel_failed", job_id=job_id)


def _data(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"
