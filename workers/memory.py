"""Memory readings of the worker's device: a CUDA device's used/total, or the process on the CPU
against a budget; and what a worker can give back under pressure."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from shared.errors import GptossError


class OutOfMemory(GptossError):
    """A request needs more memory than the worker's device has, even alone in its batch."""

    code, status, kind = "out_of_memory", 413, "invalid_request_error"


TOO_BIG_ALONE = "The request needs more memory than the worker's device has, even alone in its batch."


@dataclass(frozen=True)
class MemoryReading:
    """Bytes in use and bytes available in all, on one device."""

    device: str
    used: int
    total: int

    @property
    def pressure(self) -> float:
        """Used over total, 0..1."""
        return self.used / self.total if self.total else 0.0


def read_memory(device: str, budget: int | None = None, override: Path | None = None) -> MemoryReading:
    """The device's memory now: `torch.cuda.mem_get_info` on CUDA; on the CPU this process's RSS
    against `budget` (or the machine's memory). `override`, a JSON file {used, total}, replaces the
    reading while it exists (tests steer pressure with it)."""
    if override is not None and override.exists():
        values = json.loads(override.read_text())
        return MemoryReading(device, int(values["used"]), int(values["total"]))
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return MemoryReading(device, total - free, total)
    total = budget or psutil.virtual_memory().total
    return MemoryReading(device, psutil.Process().memory_info().rss, total)


def relieve_memory(device: str) -> None:
    """Give back what can be given back without losing work: Python garbage and cached CUDA blocks."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """`error` says the device (or the host, for a CPU worker) had no memory for a tensor."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
