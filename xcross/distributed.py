"""Data parallelism under torchrun: which process this is, joining the group, and the reductions training needs.
Without torchrun every function is the single-process identity."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist_info()


def barrier() -> None:
    if dist_info().world > 1:
        dist.barrier()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over processes in one flat buffer (the loss is already divided by the global batch)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


def reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` summed (or max-reduced) over processes, in place."""
    if dist_info().world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor
