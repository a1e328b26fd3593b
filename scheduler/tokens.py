"""Prompt token counts, with each model's own tokenizer (loaded without torch)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import structlog

from shared.contract import JobRequest
from shared.prompts import ModelNotPrepared, load_prompt_tokenizer, prompt_token_ids
from shared.registry import ModelSpec

log = structlog.get_logger()


class PromptCounter:
    """Counts prompt tokens per model; tokenizers load once from the prepared model folder."""

    def __init__(self, cache_dir: Path, vocab_dir: Path | None = None):
        self._cache_dir = cache_dir
        self._vocab_dir = vocab_dir or cache_dir / "tiktoken"
        self._tokenizers: dict[str, Any] = {}

    def count(self, spec: ModelSpec, request: JobRequest) -> int:
        """Number of tokens the worker will feed the model for `request`."""
        return len(prompt_token_ids(self.tokenizer(spec), request))

    def tokenizer(self, spec: ModelSpec) -> Any:
        """The tokenizer of `spec`, loaded on first use."""
        if spec.name not in self._tokenizers:
            self._tokenizers[spec.name] = load_prompt_tokenizer(spec, self._cache_dir, self._vocab_dir)
        return self._tokenizers[spec.name]

    def wait_for(self, spec: ModelSpec, stop: threading.Event, poll: float = 2.0) -> None:
        """Block until `spec`'s tokenizer is prepared (a worker or `gptoss model prepare` does it)
        or `stop` is set."""
        while not stop.is_set():
            try:
                self.tokenizer(spec)
                return
            except ModelNotPrepared:
                log.info("tokenizer_waiting", model=spec.name, folder=str(spec.directory(self._cache_dir)))
                stop.wait(poll)
