"""Writing a gpt-oss checkpoint in the hub's MXFP4 layout: expert weights as FP4 blocks + E8M0 scales.

The inverse of transformers' `convert_moe_packed_tensors`, so a tiny model exercises the loader
path that gpt-oss-20b and -120b take (on CPU, transformers dequantises it to bf16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""E2M1 code points, by 4-bit code (the table transformers dequantises with)."""

BLOCK = 32
"""Values sharing one scale."""

QUANTIZED = ("gate_up_proj", "down_proj")
"""Expert weights the hub stores as MXFP4; everything else stays bf16."""

QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}  # fmt: skip
"""The `quantization_config` of the hub's gpt-oss config.json."""


def quantize(weight: Any) -> tuple[Any, Any]:
    """(blocks, scales) of an expert weight [experts, in, out], as the hub stores them:
    blocks uint8 [experts, out, in/32, 16] (two codes a byte, low nibble first), scales uint8
    [experts, out, in/32] (exponent + 127)."""
    import torch

    rows = weight.float().transpose(1, 2).contiguous()  # [E, out, in]: the hub's row-major layout
    experts, out, width = rows.shape
    groups = rows.reshape(experts, out, width // BLOCK, BLOCK)
    largest = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
    # The smallest power of two that brings the block's largest value within FP4's ±6.
    exponent = torch.ceil(torch.log2(largest / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    table = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)
    codes = codes + 8 * ((scaled < 0) & (codes > 0)).long()
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return packed, scales


def write_mxfp4_checkpoint(source: Path, out: Path) -> None:
    """Rewrite the bf16/fp32 gpt-oss checkpoint in `source` into `out` in the hub's MXFP4 layout."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for shard in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(str(shard)).items():
            base = name.rsplit(".", 1)[-1]
            if base in QUANTIZED:
                blocks, scales = quantize(tensor)
                tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            else:
                tensors[name] = tensor.to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json",):
        if (source / extra).exists():
            shutil.copy(source / extra, out / extra)
