"""Memory readings of the worker's device: a CUDA device's used/total, or the process on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch


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


def read_memory(device: str) -> MemoryReading:
    """The device's memory now: `torch.cuda.mem_get_info` on CUDA, this process's RSS against the
    machine's memory on the CPU."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return MemoryReading(device, total - free, total)
    return MemoryReading(device, psutil.Process().memory_info().rss, psutil.virtual_memory().total)
