"""The hub's MXFP4 checkpoint layout: written from tiny-gpt-oss, loaded through transformers' MXFP4
path (dequantised to bf16 on CPU), generating the same harmony answer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from shared.contract import ChatMessage, JobRequest
from shared.registry import model_spec
from workers.model_store import prepare
from workers.mxfp4 import FP4_VALUES, quantize
from workers.runtime import ModelRuntime
from workers.tiny_model import CONVERSATIONS


def test_quantize_inverts_transformers_dequantisation() -> None:
    torch.manual_seed(0)
    weight = torch.randn(2, 64, 96) * 0.1  # [experts, in, out], as GptOssExperts holds it
    blocks, scales = quantize(weight)
    assert blocks.shape == (2, 96, 2, 16) and scales.shape == (2, 96, 2)
    restored = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert restored.shape == weight.shape
    # Each value lands on a code point of its block's scale: within half a step of the largest.
    assert (restored - weight).abs().max() <= weight.abs().max() / 6 * 1.0 + 1e-6
    again = convert_moe_packed_tensors(*quantize(restored), dtype=torch.float32)
    assert torch.equal(again, restored)  # representable values survive exactly
    assert len(FP4_VALUES) == 16


@pytest.fixture(scope="module")
def mxfp4_folder(prepared_models):  # type: ignore[no-untyped-def]
    return prepare(model_spec("tiny-gpt-oss-mxfp4"), prepared_models.cache_dir)


def test_checkpoint_has_the_hub_layout(mxfp4_folder) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((mxfp4_folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["vocab_size"] == 201088
    with safe_open(str(mxfp4_folder / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
        assert weights.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks").dtype == torch.uint8
    assert "model.layers.0.mlp.experts.down_proj_scales" in names
    assert not any(name.endswith("experts.gate_up_proj") for name in names)


def test_mxfp4_checkpoint_loads_and_answers(prepared_models, mxfp4_folder) -> None:  # type: ignore[no-untyped-def]
    runtime = ModelRuntime.load(model_spec("tiny-gpt-oss-mxfp4"), prepared_models)
    assert runtime.model.dtype == torch.bfloat16  # dequantised on CPU, as gpt-oss-20b is without kernels
    question, analysis, final = CONVERSATIONS[0]
    request = JobRequest(messages=[ChatMessage(role="user", content=question)], max_tokens=80, temperature=0)
    generation = runtime.generate(request)
    assert (generation.reasoning, generation.text, generation.finish_reason) == (analysis, final, "stop")
