"""The one context-fit rule: a job runs only when its prompt and its max_tokens fit the model's
context. The API applies it before queueing (so the client hears it at once), the scheduler to jobs
that reach `incoming` another way; both with the same codes."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import GptossError, PromptTooLong, ValidationFailed

REJECT_PROMPT_TOO_LONG = "prompt_too_long"
REJECT_CONTEXT_EXCEEDED = "context_exceeded"


@dataclass(frozen=True)
class Admission:
    """Whether a job may run at all; when not, a stable code and a message the user can act on."""

    admitted: bool
    code: str | None = None
    message: str | None = None


def admit(prompt_tokens: int | None, max_tokens: int, context_length: int, model: str = "") -> Admission:
    """Admit a job whose prompt and requested new tokens fit the model's context (a prompt not
    counted yet, None, holds at least one token)."""
    whose = f"the context of `{model}`" if model else "the model's context"
    if prompt_tokens is not None and prompt_tokens >= context_length:
        return Admission(
            False,
            REJECT_PROMPT_TOO_LONG,
            f"The prompt has {prompt_tokens} tokens; {whose} is {context_length}.",
        )
    prompt = 1 if prompt_tokens is None else prompt_tokens
    if prompt + max_tokens > context_length:
        counted = f"The prompt ({prompt_tokens} tokens)" if prompt_tokens is not None else "The prompt"
        return Admission(
            False,
            REJECT_CONTEXT_EXCEEDED,
            f"{counted} plus max_tokens ({max_tokens}) is over {whose} ({context_length}); "
            f"lower max_tokens to {context_length - prompt} or less.",
        )
    return Admission(True)


def refusal(admission: Admission) -> GptossError:
    """The error that answers a request refused at submission: 413 for a prompt over the context,
    422 on max_tokens for a prompt plus max_tokens over it."""
    if admission.code == REJECT_PROMPT_TOO_LONG:
        return PromptTooLong(admission.message or "")
    return ValidationFailed(
        admission.message or "",
        details=[{"loc": ["max_tokens"], "msg": "prompt plus max_tokens over the model's context"}],
    )
