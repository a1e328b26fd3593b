"""Structured outputs' grammars: an OpenAI `response_format` compiled into an llguidance grammar. Here
(no torch) so the API refuses a schema it cannot use at submission, with the same compiler the
workers decode under (workers/grammar.py)."""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance

from shared.errors import GptossError

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
"""`response_format: {"type": "json_object"}`: any JSON object."""


class InvalidSchema(GptossError):
    code, status, kind = "invalid_response_format", 422, "invalid_request_error"


def grammar_for(response_format: dict[str, Any]) -> str | None:
    """The llguidance grammar of an OpenAI `response_format` (None for plain text); InvalidSchema when
    its schema cannot be compiled. Whitespace is compact: the model cannot pad its answer. Compiled
    once per process and schema: the API, the scheduler and the worker each validate the request."""
    return _compiled(json.dumps(response_format, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _compiled(wire: str) -> str | None:
    response_format = json.loads(wire)
    kind = response_format.get("type")
    if kind == "text":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else JSON_OBJECT_SCHEMA, defaults={"whitespace_flexible": False}
        )
    except ValueError as exc:
        raise InvalidSchema(f"`response_format` has a schema that cannot be used: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidSchema(f"`response_format` has a schema that cannot be used: {error[:300]}")
    return grammar
