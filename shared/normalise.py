"""One canonical form per request, and the fingerprint that names it: requests that mean the same
render to the same bytes (so the same prompt token ids) and share a fingerprint; any difference
that can change the output gives another one."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any, TypeVar

from shared.contract import JobRequest

Request = TypeVar("Request", bound=JobRequest)

FINGERPRINT_VERSION = 2
"""Part of every fingerprint: bumped when the canonical form changes, so old entries never match."""

NOT_IN_FINGERPRINT = frozenset({"model", "cache", "session_id", "profile"})
"""Request fields that do not change the output: the model is named apart, `cache` only says
whether to use the cache, a session only says where the KV lives, and a profile's defaults are
already filled into the request when it is fingerprinted."""


LATER_FIELDS: dict[str, Any] = {"response_format": None, "logprobs": False, "top_logprobs": None, "n": 1}
"""Request fields added after responses were first cached, at the value that changes nothing: left
out of the canonical form there, so a request that does not use them keeps its fingerprint."""


def canonical_text(text: str) -> str:
    """Unicode NFC, with CRLF and lone CR turned into LF."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def canonical(request: Request) -> Request:
    """`request` with every text field (messages' content, prompt, stop sequences) canonical."""
    update: dict[str, Any] = {}
    if request.messages is not None:
        update["messages"] = [
            m.model_copy(update={"content": canonical_text(m.content)}) for m in request.messages
        ]
    if request.prompt is not None:
        update["prompt"] = canonical_text(request.prompt)
    if request.stop is not None:
        update["stop"] = [canonical_text(s) for s in request.stop]
    return request.model_copy(update=update)


def deterministic(request: JobRequest) -> bool:
    """The request always produces the same output: greedy (temperature 0) or a fixed seed. Apply
    the profile's defaults first: an unset temperature means the profile's (1.0 without one)."""
    return (request.temperature is not None and request.temperature <= 0) or request.seed is not None


def canonical_json(request: JobRequest) -> str:
    """The request's output-shaping fields as canonical JSON: sorted keys, compact separators, the
    texts canonical, stop sequences as a sorted set; a greedy request drops top_p and seed, which
    greedy decoding ignores."""
    fields = set(JobRequest.model_fields) - NOT_IN_FINGERPRINT
    data = canonical(request).model_dump(mode="json", include=fields)
    if data.get("stop") is not None:
        data["stop"] = sorted(set(data["stop"]))  # the text is cut at the first of them, whatever order
    if request.temperature is not None and request.temperature <= 0:
        data["temperature"], data["top_p"], data["seed"] = 0.0, None, None
    for name, default in LATER_FIELDS.items():  # unset, they leave earlier fingerprints as they were
        if data.get(name, default) == default:
            data.pop(name, None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(model: str, request: JobRequest, salt: str, weights: str = "") -> str:
    """SHA-256 (hex) of the model, its `weights` version (shared.registry.weights_version), the
    canonical request and `salt` (the tenant, unless the cache is shared): the name of a response
    in the cache."""
    named = json.dumps(
        [FINGERPRINT_VERSION, model, weights, salt, canonical_json(request)],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(named.encode()).hexdigest()
