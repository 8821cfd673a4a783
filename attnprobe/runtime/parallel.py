"""Several processes on PyTorch's own distributed stack: who am I, share the corpus, combine the sums.

Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1) scan gives each process every
``world``-th row of each chunk, each process reduces its share, and the per-head *sums and counts* are
all-reduced (never means), so the result equals a single-process run to float tolerance. This module
does not decide what to compute; it only moves tensors and rows between processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes (``size`` 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world(device: str = "auto") -> World:
    """Join the process group that torchrun / accelerate set up in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def device_for(world: World, device: str) -> str:
    """Each process's device: ``cuda:LOCAL_RANK`` when several processes share a machine's GPUs."""
    if world.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return device


def all_reduce_sums(sums: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Sum every tensor over processes; NaN (an unrefined layer's bp_shift) stays NaN where all are NaN."""
    if not world.distributed:
        return sums
    import torch.distributed as dist

    out = {}
    for name, value in sums.items():
        nan = torch.isnan(value)
        data = torch.nan_to_num(value).to(torch.float64).clone()
        seen = (~nan).to(torch.float64)
        if _backend_device() != "cpu":
            data, seen = data.cuda(), seen.cuda()
        dist.all_reduce(data)
        dist.all_reduce(seen)
        out[name] = torch.where(seen.cpu() > 0, data.cpu(), float("nan"))
    return out


def all_reduce_counts(counts: dict[str, int], world: World) -> dict[str, int]:
    if not world.distributed:
        return counts
    keys = sorted(counts)
    summed = all_reduce_sums({"c": torch.tensor([float(counts[k]) for k in keys])}, world)["c"]
    return {k: int(v) for k, v in zip(keys, summed.tolist())}


def gather_objects(obj, world: World) -> list | None:
    """Every process's ``obj`` on the main process (None elsewhere)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj, world: World):
    """The main process's ``obj`` on every process."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _backend_device() -> str:
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"
