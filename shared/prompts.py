"""Rendering a request into prompt token ids: one definition for the scheduler's count and the worker."""

from __future__ import annotations

from typing import Any

from shared.contract import JobRequest


def prompt_token_ids(tokenizer: Any, request: JobRequest) -> list[int]:
    """Token ids of `request`'s prompt: the chat template for messages, plain encoding for a prompt."""
    if request.messages is not None:
        messages = [m.model_dump() for m in request.messages]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return list(tokenizer(request.prompt)["input_ids"])
