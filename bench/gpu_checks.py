"""The kernel choices for gpt-oss on a GPU, each printed as worked or not, with the reason; run by
scripts/device-check after bench/gpu.py (`--device cpu`: the same checks on the 32 times smaller model,
which the tests run).

    python bench/gpu_checks.py [--device cuda] [--out DIR] [--budget 120]

1. `attention`: each attention implementation transformers offers for gpt-oss (its attention sinks
   rule some out) on gpt-oss-20b-random, one 2,048-token prefill: milliseconds and the largest logit
   difference from eager, or why it failed (the workers load `eager` today).
2. `mxfp4`: what the native MXFP4 path needs offline: triton's version, the `kernels` package, and the
   hub kernel `kernels-community/triton_kernels` it downloads (not reachable without the network).
3. `decode`: 64 new tokens for one row, plain (dynamic cache) and through a static cache compiled by
   torch.compile with CUDA graphs (`cache_implementation="static"`): tokens/s each, or why not.

DIR/gpu_checks.json is rewritten as each check ends.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu import Run  # noqa: E402

ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
             "kernels-community/vllm-flash-attn3")  # fmt: skip
"""Attention implementations tried, the workers' own first."""


class Model:
    """gpt-oss-20b-random (or its mini on the CPU) built once on `device`, and a timer around calls."""

    def __init__(self, device: str):
        import torch

        from shared.registry import model_spec
        from shared.settings import Settings
        from workers.model_store import prepare
        from workers.random_model import build_random

        self.torch, self.device = torch, device
        name = "gpt-oss-20b-random" if device.startswith("cuda") else "gpt-oss-20b-random-mini"
        folder = prepare(model_spec(name), Settings().cache_dir)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = build_random(folder, dtype, device, attn_implementation="eager").eval()
        length = 2048 if device.startswith("cuda") else 256
        self.ids = torch.randint(0, 200000, (1, length), generator=torch.Generator().manual_seed(0)).to(
            device
        )

    def timed(self, call: Any) -> tuple[Any, float]:
        """`call()`'s result and its milliseconds (the device synchronised around it)."""
        self.sync()
        started = time.perf_counter()
        result = call()
        self.sync()
        return result, (time.perf_counter() - started) * 1000

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


def attention(model: Model) -> dict[str, Any]:
    """Each implementation's prefill: worked (ms, largest logit difference from eager) or why not."""
    torch, results, reference = model.torch, {}, None
    for name in ATTENTION:
        try:
            model.model.set_attn_implementation(name)
            with torch.inference_mode():
                model.timed(lambda: model.model(model.ids))  # warm up
                out, ms = model.timed(lambda: model.model(model.ids).logits.float())
            if reference is None:
                reference = out
            diff = float((out - reference).abs().max())
            results[name] = {"worked": True, "prefill_ms": round(ms, 2), "max_logit_diff_vs_eager": diff}
        except Exception as exc:  # the reason is the finding
            results[name] = {"worked": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    model.model.set_attn_implementation("eager")
    return results


def mxfp4(model: Model) -> dict[str, Any]:
    """What the native MXFP4 path needs, and whether each piece is here."""
    from transformers.utils.import_utils import is_kernels_available, is_triton_available

    triton = importlib.util.find_spec("triton") is not None
    found: dict[str, Any] = {"triton": triton and __import__("triton").__version__,
                             "triton_at_least_3_4": is_triton_available("3.4.0"),
                             "kernels_package": is_kernels_available()}  # fmt: skip
    if not found["kernels_package"]:
        found.update(worked=False, reason="the `kernels` package is not installed: transformers dequantises "
                     "MXFP4 experts to bf16 (what the workers serve today)")  # fmt: skip
        return found
    try:
        from kernels import get_kernel

        get_kernel("kernels-community/triton_kernels")
        found.update(worked=True, reason="triton_kernels loaded (from the hub cache)")
    except Exception as exc:
        reason = f"kernels-community/triton_kernels comes from the Hub at load ({type(exc).__name__})"
        found.update(worked=False, reason=f"{reason}: offline, MXFP4 is dequantised to bf16")
    return found


def decode(model: Model) -> dict[str, Any]:
    """64 new tokens for one row, with the dynamic cache and with a compiled static cache."""
    torch, results = model.torch, {}
    prompt = model.ids[:, :128]
    for name, extra in (("dynamic_cache", {}), ("static_cache_compiled", {"cache_implementation": "static"})):
        try:

            def generate(extra: dict[str, Any] = extra) -> Any:
                with torch.inference_mode():
                    return model.model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                                eos_token_id=None, pad_token_id=0, **extra)  # fmt: skip

            _, first_ms = model.timed(generate)  # compiles, for the static cache
            out, ms = model.timed(generate)
            made = out.shape[1] - prompt.shape[1]
            results[name] = {"worked": True, "tokens_per_second": made / ms * 1000, "first_call_ms": first_ms}
        except Exception as exc:
            results[name] = {"worked": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return results


@click.command()
@click.option("--device", default="cuda", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "bench" / "results", show_default=True)
@click.option("--budget", default=150.0, show_default=True, help="Seconds for all the checks")
def main(device: str, out: Path, budget: float) -> None:
    record: dict[str, Any] = {"device": device, "at": time.time()}
    run = Run(out, budget, record, "gpu_checks")
    built: dict[str, Model] = {}
    if run.step("build", 60, lambda: (built.setdefault("model", Model(device)), {})[1]) is None:
        return
    model = built["model"]
    run.step("attention", 40, lambda: attention(model))
    run.step("mxfp4", 20, lambda: mxfp4(model))
    run.step("decode", 60, lambda: decode(model))
    for name, found in record["steps"].items():
        checks = {"": found} if "worked" in found else found
        for what, result in checks.items():
            if isinstance(result, dict) and "worked" in result:
                said = "worked" if result["worked"] else f"did not work: {result['reason']}"
                print(f"{name} {what}: {said}".replace("  ", " "))


if __name__ == "__main__":
    main()
