"""Where a worker puts its model: one device, a pipeline over its GPUs, or tensor parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared import keys
from shared.registry import ModelSpec


@dataclass(frozen=True)
class Placement:
    """How one worker process holds its model."""

    kind: Literal["device", "pipeline", "tensor-parallel"]
    device: str
    """The device inputs go to (the rank's own device under tensor parallel)."""
    world_size: int = 1
    rank: int = 0


def place(
    queue: str,
    spec: ModelSpec,
    configured_device: str | None,
    gpu_count: int,
    world_size: int = 1,
    rank: int = 0,
    local_rank: int = 0,
) -> Placement:
    """The placement for a worker on `queue`: a gpu-single worker pins one device (the configured
    one, else cuda:0, else the CPU); a gpu-multi worker spreads the model over all its GPUs, as
    tensor parallel ranks when started under torchrun, else as a pipeline (`device_map="auto"`)."""
    if world_size > 1:
        device = f"cuda:{local_rank}" if gpu_count else "cpu"
        return Placement("tensor-parallel", device, world_size, rank)
    if queue == keys.MULTI_QUEUE and gpu_count > 1:
        return Placement("pipeline", "cuda:0")
    return Placement("device", configured_device or ("cuda:0" if gpu_count else "cpu"))


def wants_torchrun(queue: str, spec: ModelSpec, gpu_count: int, world_size: int) -> bool:
    """A gpu-multi worker of a tensor-parallel model on a multi-GPU machine, not yet under torchrun."""
    multi = queue == keys.MULTI_QUEUE and gpu_count > 1
    return multi and spec.placement == "tensor-parallel" and world_size == 1
