"""Random-weight gpt-oss: the published architecture of gpt-oss-20b (or -120b) with random weights,
for measuring speed where the real weights cannot be downloaded. A model's speed does not depend on
its weights' values: this one runs exactly the kernels the real one runs.

Its prepared folder holds only the configuration; the weights are made at load time directly on
the device, in the dtype the worker computes in (never an fp32 copy on the host), so gpt-oss-20b's
~42 GB of bf16 weights exist in seconds. `shrink` scales the same architecture down (width, heads,
experts, layers) for the CPU tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.tiny_model import PAD_TOKEN_ID, STOP_TOKEN_IDS

GPT_OSS_20B: dict[str, Any] = {
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    "swiglu_limit": 7.0,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.9,
}
"""openai/gpt-oss-20b's config.json as published (sliding and full attention alternate, layer by
layer, which is GptOssConfig's default `layer_types`); its MXFP4 quantisation_config is left out:
random weights are made in the compute dtype."""

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": GPT_OSS_20B,
    "gpt-oss-120b": {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128},
}
"""The architectures a `random` registry entry may name."""


def random_config(architecture: str, shrink: int = 1) -> Any:
    """`architecture`'s GptOssConfig, scaled down `shrink` times: width, heads and experts divided
    (width in multiples of 32; at least what top-k routing and grouped-query attention need), layers
    too (at least 2, so both attention kinds remain); the vocabulary is kept whole."""
    from transformers import GptOssConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture `{architecture}`; known: {', '.join(ARCHITECTURES)}")
    values = dict(ARCHITECTURES[architecture])
    if shrink > 1:
        top_k = values["num_experts_per_tok"]
        kv_heads = max(1, values["num_key_value_heads"] // shrink)
        heads = max(kv_heads, values["num_attention_heads"] // shrink)
        layers = max(2, values["num_hidden_layers"] // shrink)
        values.update(
            hidden_size=_width(values["hidden_size"], shrink),
            intermediate_size=_width(values["intermediate_size"], shrink),
            num_attention_heads=heads - heads % kv_heads,
            num_key_value_heads=kv_heads,
            num_local_experts=max(top_k, values["num_local_experts"] // shrink),
            num_hidden_layers=layers - layers % 2,
        )
    return GptOssConfig(eos_token_id=STOP_TOKEN_IDS, pad_token_id=PAD_TOKEN_ID, **values)


def _width(width: int, shrink: int) -> int:
    """`width` divided by `shrink`, in whole multiples of 32 (the grouped expert matmul needs rows
    aligned to 16 bytes), at least 64."""
    return max(64, width // shrink // 32 * 32)


def write_random_checkpoint(architecture: str, shrink: int, out: Path) -> dict[str, Any]:
    """A folder with `architecture`'s configuration and no weights (they are made at load time);
    figures of the model it describes."""
    from transformers import GenerationConfig

    config = random_config(architecture, shrink)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    GenerationConfig(eos_token_id=STOP_TOKEN_IDS, pad_token_id=PAD_TOKEN_ID, do_sample=False).save_pretrained(
        str(out)
    )
    return {"architecture": architecture, "shrink": shrink, "parameters": parameter_count(config)}


def parameter_count(config: Any) -> int:
    """Parameters of a model of `config`, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def build_random(folder: Path, dtype: Any, device: str, **extra: Any) -> Any:
    """The model of `folder`'s configuration, its weights made on `device` in `dtype` (seeded, so
    every worker of one machine builds the same weights)."""
    import torch
    from transformers import AutoConfig, GptOssForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    torch.manual_seed(0)
    dtype = dtype if dtype != "auto" else torch.bfloat16
    with torch.device(device):
        model = GptOssForCausalLM._from_config(config, dtype=dtype, **extra)
    generation = json.loads((folder / "generation_config.json").read_text())
    model.generation_config.eos_token_id = generation.get("eos_token_id")
    model.generation_config.pad_token_id = generation.get("pad_token_id")
    return model
