"""The model runtime: the model loaded once, and one request's generation."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from shared.contract import JobRequest
from shared.prompts import prompt_token_ids
from shared.registry import ModelSpec
from shared.settings import Settings
from workers.model_store import prepare

log = structlog.get_logger()


@dataclass(frozen=True)
class Generation:
    """What one request produced."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


def pick_device(configured: str | None) -> str:
    """The configured device, else the first GPU, else the CPU."""
    if configured:
        return configured
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class FirstTokenStreamer(BaseStreamer):
    """Calls `on_first_token` when generate() emits its first new token (its first put is the prompt)."""

    def __init__(self, on_first_token: Callable[[], None]):
        self._on_first_token = on_first_token
        self._puts = 0

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2:
            self._on_first_token()

    def end(self) -> None:
        pass


class ModelRuntime:
    """One model on one device, ready to generate."""

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any, device: str):
        self.spec, self.model, self.tokenizer, self.device = spec, model, tokenizer, device

    @classmethod
    def load(cls, spec: ModelSpec, settings: Settings) -> ModelRuntime:
        """Prepare (once) and load `spec` onto the configured device."""
        started = time.perf_counter()
        folder: Path = prepare(spec, settings.cache_dir)
        device = pick_device(settings.device)
        dtype = getattr(torch, spec.dtype) if spec.dtype != "auto" else "auto"
        extra: dict[str, Any] = {}
        if spec.source == "random-gpt-oss" or spec.chat_format == "harmony":
            extra["attn_implementation"] = "eager"  # sdpa and flex do not support gpt-oss on CPU
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra).to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        log.info(
            "model_loaded",
            model=spec.name,
            device=device,
            dtype=str(model.dtype),
            seconds=round(time.perf_counter() - started, 3),
        )
        return cls(spec, model, tokenizer, device)

    def generate(self, request: JobRequest, on_first_token: Callable[[], None]) -> Generation:
        """Generate a completion for `request`, calling `on_first_token` when the first token exists."""
        ids = prompt_token_ids(self.tokenizer, request)
        input_ids = torch.tensor([ids], device=self.device)
        max_tokens = request.max_tokens or 1
        config = self._generation_config(request, max_tokens)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        extra: dict[str, Any] = {}
        if request.stop:
            extra = {"stop_strings": request.stop, "tokenizer": self.tokenizer}
        with torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                streamer=FirstTokenStreamer(on_first_token),
                **extra,
            )
        new_ids = output[0, len(ids) :].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, request.stop or [])
        ended_by_eos = bool(new_ids) and new_ids[-1] in _as_set(config.eos_token_id)
        finish: Literal["stop", "length"] = (
            "stop" if stopped or ended_by_eos or len(new_ids) < max_tokens else "length"
        )
        return Generation(text, finish, len(ids), len(new_ids))

    def _generation_config(self, request: JobRequest, max_tokens: int) -> GenerationConfig:
        # Built from scratch so only the request's parameters apply, not a checkpoint's defaults.
        base = self.model.generation_config
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else base.eos_token_id
        sampling: dict[str, Any] = {"do_sample": False}
        if request.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "top_k": 0,
            }
        return GenerationConfig(
            max_new_tokens=max_tokens,
            eos_token_id=base.eos_token_id,
            bos_token_id=base.bos_token_id,
            pad_token_id=pad,
            **sampling,
        )


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _as_set(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
