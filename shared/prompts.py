"""Rendering a request into prompt token ids: one definition for the API's and scheduler's count and
the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.contract import JobRequest
from shared.errors import GptossError
from shared.harmony import HarmonyChat, VocabUnavailable
from shared.registry import ModelSpec


class ModelNotPrepared(GptossError):
    code, status, kind = "model_not_prepared", 503, "server_error"


_renders = [0]


def renders() -> int:
    """Prompts this process has rendered into token ids (each request should cost at most two: the
    API's count, which travels in the job's record, and the worker's ids)."""
    return _renders[0]


def prompt_token_ids(tokenizer: Any, request: JobRequest) -> list[int]:
    """Token ids of `request`'s prompt: harmony for gpt-oss, else the chat template for messages and
    plain encoding for a prompt."""
    _renders[0] += 1
    if isinstance(tokenizer, HarmonyChat):
        return tokenizer.render(request)
    if request.messages is not None:
        messages = [m.model_dump() for m in request.messages]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return list(tokenizer(request.prompt)["input_ids"])


def tools_supported(spec: ModelSpec) -> bool:
    """`spec` can be offered tools: harmony renders functions and parses calls for gpt-oss; a chat
    template would need both a `tools` variable and a parser for the calls it makes (transformers'
    `response_template`), which no template model of the registry has, so those models refuse tools."""
    return spec.chat_format == "harmony"


def load_prompt_tokenizer(spec: ModelSpec, cache_dir: Path, vocab_dir: Path | None) -> Any:
    """What renders `spec`'s prompts without torch: harmony for gpt-oss, else the prepared tokenizer."""
    if spec.chat_format == "harmony":
        chat = HarmonyChat(vocab_dir)
        try:
            chat.encoding  # noqa: B018 -- load now, so a missing vocabulary shows at once
        except VocabUnavailable as exc:
            raise ModelNotPrepared(exc.message) from None
        return chat
    from transformers import PreTrainedTokenizerFast  # renders chat templates without importing torch

    folder = spec.directory(cache_dir)
    if not (folder / "tokenizer.json").exists():
        raise ModelNotPrepared(f"The tokenizer of `{spec.name}` is not prepared in {folder}.")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
