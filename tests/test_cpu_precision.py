"""bf16 weights on a CPU without native bf16: a batching worker computes in float32 and multiplies
small steps in bf16 (workers/cpu_precision.py); which dtype a worker loads (load_dtype)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from shared.registry import model_spec
from shared.settings import Settings
from workers.cpu_precision import SMALL_ROWS, DualLinear, add_bf16_path, native_cpu_bf16
from workers.model_store import prepare
from workers.placement import Placement
from workers.runtime import ModelRuntime, load_dtype

CPU = Placement("device", "cpu")


def test_small_inputs_multiply_in_bf16_and_large_ones_in_float32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    dual = DualLinear(linear)
    bf16 = copy.deepcopy(linear).to(torch.bfloat16)
    with torch.inference_mode():
        for rows in (1, SMALL_ROWS, SMALL_ROWS + 1, 16):
            x = torch.randn(2, rows, 64) if rows == 16 else torch.randn(rows, 64)
            exact = F.linear(x, dual.weight, dual.bias)
            out = dual(x)
            assert out.dtype == torch.float32 and out.shape == exact.shape
            if x.numel() // 64 <= SMALL_ROWS:
                assert torch.equal(out, bf16(x.to(torch.bfloat16)).float())
                assert not torch.equal(out, exact)  # really the bf16 path
            else:
                assert torch.equal(out, exact)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_every_linear_gets_the_bf16_path_and_tied_weights_stay_tied() -> None:
    model = tiny_llama()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        assert add_bf16_path(model) == linears
        assert not any(type(m) is nn.Linear for m in model.modules())
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model(input_ids=ids).logits, before)  # a 12-token prefill stays float32
        one = model(input_ids=ids[:, :1]).logits  # one token: bf16 matmuls, close to float32
        assert torch.allclose(one, before[:, :1], atol=0.05) and not torch.equal(one, before[:, :1])


def test_a_batching_cpu_worker_without_native_bf16_computes_in_float32(prepared_models: Settings) -> None:
    spec = model_spec("smollm2-135m")  # stored in bf16
    folder = spec.directory(prepared_models.cache_dir)
    batching = Settings(max_batch_size=8)
    expected = (torch.bfloat16, False) if native_cpu_bf16() else (torch.float32, True)
    assert load_dtype(spec, batching, CPU, folder) == expected
    assert load_dtype(spec, batching, Placement("device", "cuda:0"), folder) == (torch.bfloat16, False)
    assert load_dtype(spec, Settings(max_batch_size=1), CPU, folder) == (torch.bfloat16, False)
    tensor_parallel = Placement("tensor-parallel", "cpu", world_size=2)
    assert load_dtype(spec, batching, tensor_parallel, folder) == (torch.bfloat16, False)
    assert load_dtype(spec, Settings(max_batch_size=8, dtype="float32"), CPU, folder) == (
        torch.float32,
        False,
    )
    quantised = model_spec("tiny-gpt-oss-mxfp4")  # dequantised to bf16: its size is not its files'
    assert load_dtype(quantised, batching, CPU, prepare(quantised, prepared_models.cache_dir))[1] is False
    tiny = model_spec("tiny-gpt-oss")  # stored in float32: nothing to gain
    assert load_dtype(tiny, batching, CPU, tiny.directory(prepared_models.cache_dir)) == (
        torch.float32,
        False,
    )


def test_the_dual_model_answers_like_float32_where_steps_are_large(prepared_models: Settings) -> None:
    """SmolLM2 with the bf16 path: a batch of 8 decodes in float32 steps, so its greedy tokens
    match a plain float32 batch; a single stream (bf16 steps) starts with the same token. A
    batching worker's load adds the path exactly where load_dtype says."""
    from tests.conftest import QUESTIONS, run_batch, sentence_request

    spec = model_spec("smollm2-135m")
    float32 = prepared_models.model_copy(update={"dtype": "float32"})
    plain, dual = ModelRuntime.load(spec, float32), ModelRuntime.load(spec, float32)
    add_bf16_path(dual.model)
    requests = [sentence_request(q, max_tokens=6) for q in QUESTIONS]
    expected = run_batch(plain, requests)
    assert run_batch(dual, requests) == expected
    assert dual.run(requests[0]).token_ids[0] == expected[0][0]
    loaded = ModelRuntime.load(spec, prepared_models.model_copy(update={"max_batch_size": 8}))
    assert any(isinstance(m, DualLinear) for m in loaded.model.modules()) == (not native_cpu_bf16())
