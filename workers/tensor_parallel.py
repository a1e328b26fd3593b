"""Tensor parallel workers: ranks started by torchrun, rank 0 takes jobs and hands each to the rest.

Every rank must call `generate()` with the same request at the same time, because the sharded
layers all-reduce inside each forward pass. Rank 0 broadcasts each request over a gloo group
(about 2 ms); the other ranks wait for the next one, with a long timeout so idle ranks live on.
"""

from __future__ import annotations

import os
import random
import sys
from datetime import timedelta
from typing import Any, Protocol

import structlog

from shared.contract import JobRequest
from shared.registry import model_spec
from shared.settings import Settings
from workers.placement import Placement, place, wants_torchrun

log = structlog.get_logger()


class RunsAlone(Protocol):
    """What a rank other than 0 needs of its model runtime (workers/runtime.ModelRuntime)."""

    def run(self, request: JobRequest) -> Any: ...


def torchrun_ranks() -> tuple[int, int, int]:
    """(world size, rank, local rank) that torchrun gave this process; (1, 0, 0) outside torchrun."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def start_group(device: str, timeout_s: int) -> Any:
    """Join the ranks' process group (NCCL on GPUs, gloo on CPUs); the gloo group requests travel on.

    Created here rather than by transformers so the timeout is ours: the default would end ranks
    that wait longer than 10 minutes for a job.
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.new_group(backend="gloo", timeout=timeout)


class RequestRelay:
    """Rank 0's hand-over of each request to the other ranks."""

    def __init__(self, group: Any):
        self._group = group

    def share(self, request: JobRequest | None) -> JobRequest | None:
        """Send `request` (None: stop) to every rank; sampling gets a seed so all ranks draw alike."""
        import torch.distributed as dist

        if request is not None and request.seed is None and (request.temperature or 0) > 0:
            request = request.model_copy(update={"seed": random.randrange(2**63)})
        payload = [request.model_dump(mode="json") if request is not None else None]
        dist.broadcast_object_list(payload, src=0, group=self._group)
        return request

    def release(self) -> None:
        """Tell the other ranks to stop; they may already be gone (torchrun stops all ranks at once)."""
        try:
            self.share(None)
        except Exception as exc:  # gloo reports a peer that already exited as a RuntimeError
            log.info("ranks_already_gone", error=type(exc).__name__)

    def follow(self, runtime: RunsAlone) -> None:
        """On ranks other than 0: run each request rank 0 sends, until it sends None."""
        import torch.distributed as dist

        while True:
            payload: list[Any] = [None]
            dist.broadcast_object_list(payload, src=0, group=self._group)
            if payload[0] is None:
                log.info("rank_released")
                return
            runtime.run(JobRequest.model_validate(payload[0]))


def relaunch_under_torchrun(nproc: int, env: dict[str, str]) -> None:
    """Replace this process with torchrun starting `nproc` ranks of the worker (never returns)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    argv += ["-m", "workers"]
    log.info("torchrun_relaunch", nproc=nproc)
    os.execve(sys.executable, argv, {**os.environ, **env})


def placement_for(settings: Settings) -> Placement:
    """This worker process's placement. A gpu-multi worker of a tensor-parallel model on a machine
    with several GPUs first re-executes itself under torchrun, one rank per GPU."""
    import torch

    world, rank, local = torchrun_ranks()
    gpus = torch.cuda.device_count()
    spec = model_spec(settings.model)
    if wants_torchrun(settings.worker_queue, spec, gpus, world):
        relaunch_under_torchrun(
            gpus, {"GPTOSS_MODEL": settings.model, "GPTOSS_WORKER_QUEUE": settings.worker_queue}
        )
    return place(settings.worker_queue, spec, settings.device, gpus, world, rank, local)
