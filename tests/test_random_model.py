"""gpt-oss-20b-random: gpt-oss-20b's published architecture with random weights made on the device at
load time, and its 32 times smaller variant through the whole pipeline (`bench/gpu.py --device cpu`,
started the way a user starts it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.registry import model_spec
from shared.settings import Settings
from workers.model_store import ModelUnavailable, prepare
from workers.placement import Placement
from workers.random_model import build_random, parameter_count, random_config
from workers.runtime import ModelRuntime

ROOT = Path(__file__).resolve().parent.parent


def test_the_20b_architecture_is_the_published_one() -> None:
    config = random_config("gpt-oss-20b")
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (24, 32, 4)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (2880, 64, 8)
    assert config.vocab_size == 201088 and config.sliding_window == 128
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"] and len(config.layer_types) == 24
    assert round(parameter_count(config) / 1e9, 1) == 20.9  # gpt-oss-20b's 20.9B parameters
    assert round(parameter_count(random_config("gpt-oss-120b")) / 1e9, 1) == 116.8


def test_the_mini_variant_keeps_the_shape_of_the_architecture() -> None:
    config = random_config("gpt-oss-20b", shrink=32)
    assert config.num_hidden_layers == 2
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.num_local_experts == 4 == config.num_experts_per_tok
    assert config.hidden_size % 32 == 0 and config.vocab_size == 201088
    with pytest.raises(ValueError, match="unknown architecture"):
        random_config("gpt-oss-7b")


def test_the_prepared_folder_holds_no_weights_and_the_model_is_made_in_the_compute_dtype(
    tmp_path: Path,
) -> None:
    folder = prepare(model_spec("gpt-oss-20b-random-mini"), tmp_path)
    assert not list(folder.glob("*.safetensors"))  # the configuration only: weights are made at load
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    model = build_random(folder, torch.bfloat16, "cpu", attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    again = build_random(folder, torch.bfloat16, "cpu", attn_implementation="eager")
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded: every worker the same


def test_random_weights_are_made_on_one_device_only(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, tiktoken_dir=Settings().vocab_dir())
    with pytest.raises(ModelUnavailable, match="gpu-single"):
        ModelRuntime.load(model_spec("gpt-oss-20b-random-mini"), settings, Placement("pipeline", "cpu"))


def test_ignore_eos_makes_every_token(tmp_path: Path) -> None:
    from shared.contract import JobRequest

    settings = Settings(cache_dir=tmp_path, tiktoken_dir=Settings().vocab_dir(), ignore_eos=True)
    runtime = ModelRuntime.load(model_spec("gpt-oss-20b-random-mini"), settings)
    made = runtime.generate(JobRequest(prompt="hello", max_tokens=40, temperature=1.0, seed=3))
    assert made.completion_tokens == 40


def test_the_gpu_bench_runs_scaled_down_through_the_pipeline(tmp_path: Path) -> None:
    bench = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--out", str(tmp_path), "--budget", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    steps = record["steps"]
    for name in ("pipeline_1", "pipeline_16", "observability_off", "pipeline_64"):
        step = steps[name]
        assert "error" not in step, step
        # Random weights, GPTOSS_IGNORE_EOS: every request made every token it asked for.
        assert step["completion_tokens"] == step["requests"] * record["new_tokens"]
        assert 0 < step["ttft_p50_s"] <= step["ttft_p95_s"] <= step["e2e_p95_s"]
    assert steps["pipeline_16"]["requests"] == 4 and steps["pipeline_64"]["requests"] == 8
    assert steps["raw_generate"]["batch_tokens_per_second"] > 0
    assert "skipped" in steps["transformers_serve"]
    assert set(record["ratios"]) >= {"pipeline_1_vs_raw_single", "observability_on_vs_off_tokens_per_second"}
    assert "target TTFT < 2.0 s" in bench.stdout


def test_the_kernel_checks_say_what_worked_and_why_not(tmp_path: Path) -> None:
    checks = subprocess.run(
        [sys.executable, "bench/gpu_checks.py", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert checks.returncode == 0, checks.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_checks.json").read_text())["steps"]
    assert steps["attention"]["eager"]["worked"]  # what the workers load
    assert not steps["attention"]["sdpa"]["worked"] and "sdpa" in checks.stdout  # sinks: not in sdpa
    assert "worked" in steps["mxfp4"] and steps["mxfp4"]["reason"]
    assert steps["decode"]["dynamic_cache"]["tokens_per_second"] > 0
    assert "attention eager: worked" in checks.stdout


def test_the_device_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device-check")]).returncode == 0
