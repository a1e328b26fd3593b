"""The stored Response: what `GET /v1/responses/{id}` and `previous_response_id` need beyond the job
itself (its request echo, its input items, the conversation it ran), one small record per tenant
and response in Redis, kept as long as the job's own record."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from redis import Redis

from api.responses_types import ResponseHead, ResponseNotFound
from shared import keys
from shared.contract import ChatMessage


class StoredResponse(BaseModel):
    """One response's record."""

    head: ResponseHead
    input_items: list[dict[str, Any]]
    """This request's input items as given (ids added), for `GET .../input_items`."""
    conversation: list[ChatMessage]
    """Every earlier turn and this input, without the instructions (a follow-up gives its own)."""
    session_id: str
    """The session whose KV cache the chain's turns share (the chain's first session)."""


class ResponseStore:
    """Stored responses of every tenant, each under its tenant's own key for `ttl` seconds."""

    def __init__(self, redis: Redis, ttl: int):
        self._redis, self._ttl = redis, ttl

    def save(self, tenant: str, stored: StoredResponse) -> None:
        """Keep `stored` for the store's TTL."""
        self._redis.set(keys.stored_response(tenant, stored.head.id), stored.model_dump_json(), ex=self._ttl)

    def load(self, tenant: str, response_id: str) -> StoredResponse:
        """`tenant`'s response `response_id`; 404 when it has none of that id (another tenant's, one
        not stored, deleted or expired)."""
        raw = self._redis.get(keys.stored_response(tenant, response_id))
        if raw is None:
            raise ResponseNotFound(f"No response with id `{response_id}` was found.")
        return StoredResponse.model_validate_json(raw)

    def delete(self, tenant: str, response_id: str) -> bool:
        """Forget the response; False when there was none."""
        return bool(self._redis.delete(keys.stored_response(tenant, response_id)))
