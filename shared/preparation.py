"""A request made ready to run: the served model, its profile's defaults, a max_tokens that fits,
its tools checked and its prompt counted; or refused (404, 413, 422). The API runs it on every
submission and the scheduler's batch feeder on every batch line, so both decide alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from shared.context_fit import admit, refusal
from shared.contract import JobRequest
from shared.errors import ModelNotFound, ValidationFailed
from shared.profiles import apply_profile, max_tokens_limit, profile_named
from shared.prompts import prompt_token_ids, tools_supported
from shared.registry import ModelSpec, canonical_name, model_spec
from shared.settings import Settings
from shared.tool_rules import check_tools, uses_tools
from shared.tools import ToolsUnsupported

TokenizerOf = Callable[[ModelSpec], Any | None]
"""The prompt tokenizer of a model, or None while it is not prepared (then the prompt is not
counted here, and the scheduler counts it)."""


class Prepared(NamedTuple):
    """A request as it will run, its model, its max_tokens and its prompt's tokens (None: not counted)."""

    payload: JobRequest
    model: str
    max_tokens: int
    prompt_tokens: int | None


def prepare(job_request: JobRequest, settings: Settings, tokenizer_of: TokenizerOf) -> Prepared:
    """The request as it will run (served model, profile defaults, max_tokens that fits), its model,
    its max_tokens and its prompt's tokens; refuses what cannot run here (404, 413, 422)."""
    served = settings.model
    model = canonical_name(job_request.model) if job_request.model else served
    if model != served:
        model_spec(model)  # an unknown name gets the registry's own message
        raise ModelNotFound(f"The model `{model}` is not served here; this server serves `{served}`.")
    profile_name = job_request.profile or settings.profile
    profile = profile_named(profile_name) if profile_name else None
    payload = apply_profile(
        job_request.model_copy(update={"model": model}), profile, settings.default_max_tokens
    )
    max_tokens = payload.max_tokens or settings.default_max_tokens
    limit = max_tokens_limit(profile, settings.max_tokens_limit)
    if max_tokens > limit:
        whose = f"the `{profile.name}` profile's" if profile is not None else "this server's"
        raise ValidationFailed(
            f"max_tokens is {max_tokens}, over {whose} limit of {limit}.",
            details=[{"loc": ["max_tokens"], "msg": "over the limit"}],
        )
    spec = model_spec(model)
    check_request_tools(spec, payload)
    prompt_tokens = count_prompt(spec, payload, tokenizer_of)
    explicit = job_request.max_tokens is not None
    if not explicit:
        max_tokens = min(max_tokens, spec.context_length - 1)
        if prompt_tokens is not None:  # a default is shortened to fit; the client's own is checked
            max_tokens = max(1, min(max_tokens, spec.context_length - prompt_tokens))
    admission = admit(prompt_tokens, max_tokens, spec.context_length, spec.name)
    if not admission.admitted:
        raise refusal(admission)
    return Prepared(payload.model_copy(update={"max_tokens": max_tokens}), model, max_tokens, prompt_tokens)


def check_request_tools(spec: ModelSpec, request: JobRequest) -> None:
    """Refuse tools, tool choices and tool messages that do not fit together, or that `spec`'s chat
    format cannot render (422 `tools_unsupported`, naming the model)."""
    check_tools(request)
    if uses_tools(request) and not tools_supported(spec):
        raise ToolsUnsupported(
            f"The model `{spec.name}` cannot call tools: its chat template has no tool support. "
            "Send the request without `tools`, `tool_choice` and tool messages, or use a gpt-oss model."
        )


def count_prompt(spec: ModelSpec, request: JobRequest, tokenizer_of: TokenizerOf) -> int | None:
    """The prompt's tokens; None while the model's tokenizer is not prepared."""
    tokenizer = tokenizer_of(spec)
    return len(prompt_token_ids(tokenizer, request)) if tokenizer is not None else None
