"""A request body read: strict UTF-8 JSON within depth and size limits, every string valid Unicode,
then validated by a request model. Each refusal is a domain error with its own code. Pure (the API's
`api/body.read_json` feeds it the request's bytes; the batch feeder a file's line)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import (
    DuplicateKey,
    InvalidEncoding,
    InvalidJson,
    JsonTooDeep,
    LoneSurrogate,
    NonFiniteNumber,
    UnsupportedParameter,
    ValidationFailed,
)

MAX_JSON_DEPTH = 64
"""Arrays and objects a body may nest; deeper is refused before parsing (Python's json parser
recurses once per level and would hit the interpreter's recursion limit near 1,000)."""

UNSUPPORTED = "unsupported_parameter"
"""The pydantic error type a request model raises for a parameter set beyond what is implemented."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
"""A JSON string: brackets inside one do not nest."""

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b'[]{}"')
_ONE_KIND = bytes.maketrans(b"{}", b"[]")

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""Strict UTF-8 holds no surrogates, so one can only come from a `\\u` escape (pairs decode whole)."""

Model = TypeVar("Model", bound=BaseModel)


def decode(raw: bytes) -> Any:
    """`raw` parsed as JSON (RFC 8259: UTF-8, finite numbers, unique keys), refused with a domain
    error otherwise; the depth is checked on the text before the parser recurses into it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEncoding(f"The request body is not UTF-8: {exc.reason} at byte {exc.start}.") from None
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise JsonTooDeep(f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} deep.")
    try:
        body = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise InvalidJson(f"The request body is not valid JSON: {exc}.") from None
    if _SURROGATE_ESCAPE.search(text):
        _refuse_surrogates(body, [])
    return body


def json_depth(raw: bytes, cap: int = MAX_JSON_DEPTH) -> int:
    """How deep the arrays and objects of JSON `raw` nest, outside strings; `cap` + 1 for anything
    deeper. Each pass drops the innermost pairs in C (no recursion, at most `cap` + 1 passes). Of
    text that is not JSON, an estimate (the parser refuses it next)."""
    brackets = (_STRING.sub(b"", raw) if b'"' in raw else raw).translate(_ONE_KIND, _NOT_BRACKETS)
    unterminated = brackets.find(b'"')  # what follows an unterminated string is inside it
    if unterminated >= 0:
        brackets = brackets[:unterminated]
    depth = 0
    while brackets and depth <= cap:
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):  # unbalanced: its open brackets nest on what was matched
            return min(depth + brackets.count(b"["), cap + 1)
        brackets, depth = inner, depth + 1
    return min(depth, cap + 1)


def parse_body(body: Any, model: type[Model]) -> Model:
    """`body` validated as `model`: 422 with each field's problem (`unsupported_parameter` when a
    parameter is set beyond what the server implements)."""
    if not isinstance(body, dict):
        raise InvalidJson("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        unsupported = [e for e in errors if e["type"] == UNSUPPORTED]
        if unsupported:
            details = [
                {"loc": [*e["loc"], name], "msg": msg, "type": UNSUPPORTED}
                for e in unsupported
                for name, msg in e["ctx"]["parameters"].items()
            ]
            raise UnsupportedParameter("; ".join(d["msg"] for d in details), details=details) from None
        raise ValidationFailed("The request has invalid fields.", details=_details(errors)) from None


def _details(errors: list[Any]) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]


def invalid_fields(exc: ValueError) -> ValidationFailed:
    """The 422 for `exc`: each field's problem when pydantic raised it (never its raw text, which
    names internal models), else its message."""
    if not isinstance(exc, ValidationError):
        return ValidationFailed(f"The request has invalid fields: {exc}")
    errors = exc.errors(include_url=False, include_input=False)
    details = _details(errors)
    said = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'request'}: {d['msg']}" for d in details)
    return ValidationFailed(f"The request has invalid fields: {said}", details=details)


def _refuse_constant(name: str) -> Any:
    raise NonFiniteNumber(f"The request body holds `{name}`; JSON numbers must be finite.")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise NonFiniteNumber(f"The number `{literal[:32]}` is out of range; JSON numbers must be finite.")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) == len(pairs):
        return found
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKey(
                f"The key `{key[:64]}` appears twice in one object: which one applies is unclear."
            )
        seen.add(key)
    return found  # not reached: a shorter dict means a repeated key


def _refuse_surrogates(value: Any, loc: list[str | int]) -> None:
    """Raise LoneSurrogate at the first string (or key) holding one; recursion is bounded by the
    depth limit already checked."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                detail = {"loc": loc, "msg": "String holds a lone UTF-16 surrogate", "type": "lone_surrogate"}
                raise LoneSurrogate(
                    "A string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                    "which is not Unicode text.",
                    details=[detail],
                ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(key, loc)  # a bad key is not echoed in the location
            _refuse_surrogates(item, [*loc, key])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_surrogates(item, [*loc, index])
