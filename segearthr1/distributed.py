"""Small torch.distributed helpers for entry points launched with `torchrun` (or run as one process).

Why here: evaluation shards samples by rank and reduces results itself; it needs only "init from
the launcher's environment", rank/world, a barrier and a gather of Python objects. gloo is used on
CPU, nccl on CUDA. Without a launcher (WORLD_SIZE unset or 1) everything degrades to one process.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = 60


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank, world size, local rank and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # True if init_distributed created the process group (cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun "
                         "(unset it to run a single process)") from err


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def _pick_device(requested: str | torch.device | None, local_rank: int) -> torch.device:
    """`auto`: CUDA if available else CPU; a bare `cuda` becomes cuda:<local_rank> under a launcher."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={requested!r} was requested but CUDA is not available; use --device cpu "
                             "or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def init_distributed(device: str | torch.device | None = "auto",
                     timeout_min: int = DEFAULT_TIMEOUT_MIN) -> DistContext:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); one process when WORLD_SIZE is unset or 1.

    Backend: nccl when the chosen device is CUDA, gloo otherwise. An already initialised group is
    reused as it is.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    chosen = _pick_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, False)
    if world_size <= 1:
        return DistContext(0, 1, 0, chosen, False)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed; run a "
                           "single process or install a torch with distributed support")
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    logger.info("joined process group: rank %d of %d (backend %s, device %s)", dist.get_rank(),
                dist.get_world_size(), backend, chosen)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, True)


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects); [obj] in one process."""
    if not is_initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup(ctx: DistContext | None) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if ctx is not None and ctx.initialized_here and is_initialized():
        dist.destroy_process_group()
