"""Scale-out through ``torchrun``: DistributedDataParallel with NCCL on GPU and gloo on CPU, logging on rank 0.

Single process when ``WORLD_SIZE`` is unset. Multi-GPU / multi-node::

    torchrun --nproc_per_node 8 -m flare.train.cli fit DATALIST --config flare23 --fold 0 -o CKPT
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m flare.train.cli fit ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: Any  # torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(backend: str | None = None) -> Dist:
    """Initialise the process group from torchrun's environment (no-op for a single process)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return Dist(rank, world, local, device)


def wrap(net: Any, d: Dist) -> Any:
    """DDP-wrap ``net`` (already on ``d.device``) when running distributed; SyncBatchNorm on GPU."""
    import torch

    if d.world == 1:
        return net
    if d.device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=[d.device.index])
    return torch.nn.parallel.DistributedDataParallel(net)


def shard(items: list[Any], d: Dist) -> list[Any]:
    """This rank's share of ``items`` (every rank gets the same count, repeating items if needed)."""
    if d.world == 1 or not items:
        return items
    per = -(-len(items) // d.world)
    padded = (items * (per * d.world // len(items) + 1))[: per * d.world]
    return padded[d.rank::d.world]


def barrier(d: Dist) -> None:
    import torch.distributed as dist

    if d.world > 1 and dist.is_initialized():
        dist.barrier()


def unwrap(net: Any) -> Any:
    return getattr(net, "module", net)
