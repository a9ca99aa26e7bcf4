"""Process-group helpers for `accelerate launch` / `torchrun`: rank, world size, barrier.

A single process needs nothing initialised. Under a launcher (WORLD_SIZE > 1) the default process group is
created once, with NCCL when the stage runs on CUDA, else gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff `flag` is True on every rank (used to agree on errors and skips)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (work done once, e.g. hashing the image files, shared)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=torch.device("cuda", torch.cuda.current_device())
                                    if tdist.get_backend() == "nccl" else None)
        return box[0]


def init(device: str = "cpu") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not tdist.is_initialized():
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if on_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        tdist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local)


def resolve_device(device: str, dist: Dist | None = None) -> str:
    """`auto` -> `cuda:<local rank>` when CUDA is available, else `cpu`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from .errors import PipelineError

            raise PipelineError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        device = f"cuda:{dist.local_rank if dist else 0}"
    return device
