"""Scale-out through ``torchrun``: DistributedDataParallel with NCCL on GPU and gloo on CPU, logging on rank 0.

Single process when ``WORLD_SIZE`` is unset. One node with 8 GPUs, and two nodes (run on each, R = 0 and 1)::

    torchrun --standalone --nproc_per_node 8 -m flare.train.cli fit DATALIST --config flare23 --fold 0 -o CKPT
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 \
        -m flare.train.cli fit DATALIST --config flare23 --fold 0 -o CKPT

Every collective has a timeout (``FLARE_DIST_TIMEOUT_MIN``, default 30 minutes) so a rank that died does not leave
the others waiting forever.
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


def setup(backend: str | None = None, timeout_min: float | None = None) -> Dist:
    """Initialise the process group from torchrun's environment (no-op for a single process)."""
    from datetime import timedelta

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
        minutes = float(timeout_min or os.environ.get("FLARE_DIST_TIMEOUT_MIN", "30"))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timedelta(minutes=minutes))
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


def gather(items: list[Any], d: Dist) -> list[Any]:
    """Every rank's ``items`` concatenated in rank order, on every rank (``all_gather_object``)."""
    import torch.distributed as dist

    if d.world == 1 or not dist.is_initialized():
        return list(items)
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def barrier(d: Dist) -> None:
    import torch.distributed as dist

    if d.world > 1 and dist.is_initialized():
        dist.barrier()


def unwrap(net: Any) -> Any:
    return getattr(net, "module", net)
