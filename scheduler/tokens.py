"""Prompt token counts, with each model's own tokenizer (loaded without torch)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog
from transformers import PreTrainedTokenizerFast

from shared.contract import JobRequest
from shared.errors import GptossError
from shared.prompts import prompt_token_ids
from shared.registry import ModelSpec

log = structlog.get_logger()


class ModelNotPrepared(GptossError):
    code, status, kind = "model_not_prepared", 503, "server_error"


class PromptCounter:
    """Counts prompt tokens per model; tokenizers load once from the prepared model folder."""

    def __init__(self, cache_dir: Path):
        self._cache_dir = cache_dir
        self._tokenizers: dict[str, Any] = {}

    def count(self, spec: ModelSpec, request: JobRequest) -> int:
        """Number of tokens the worker will feed the model for `request`."""
        return len(prompt_token_ids(self.tokenizer(spec), request))

    def tokenizer(self, spec: ModelSpec) -> Any:
        """The tokenizer of `spec`, loaded on first use."""
        if spec.name not in self._tokenizers:
            folder = spec.directory(self._cache_dir)
            if not (folder / "tokenizer.json").exists():
                raise ModelNotPrepared(f"The tokenizer of `{spec.name}` is not prepared in {folder}.")
            self._tokenizers[spec.name] = PreTrainedTokenizerFast.from_pretrained(str(folder))
        return self._tokenizers[spec.name]

    def wait_for(self, spec: ModelSpec, poll: float = 2.0, timeout: float | None = None) -> None:
        """Block until `spec`'s tokenizer is prepared (a worker or `gptoss model prepare` does it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self.tokenizer(spec)
                return
            except ModelNotPrepared:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                log.info("tokenizer_waiting", model=spec.name, folder=str(spec.directory(self._cache_dir)))
                time.sleep(poll)
