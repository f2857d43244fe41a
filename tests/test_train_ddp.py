"""Two gloo processes run DistributedDataParallel steps of a tiny net and end with identical weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist
    from flare.train.config import load_config, role_config
    from flare.train.distributed import setup, unwrap, wrap
    from flare.train.engine import make_loss, make_optimizer, train_steps
    from flare.train.networks import build_network

    torch.set_num_threads(1)
    d = setup()
    assert d.world == 2 and d.device.type == "cpu"
    eff = role_config(load_config("tiny"), "fold")
    spec = {**eff["network"], "init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2}
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    net = build_network(spec)
    model = wrap(net, d)
    opt, sched = make_optimizer(model, eff, total_steps=4, warmup_steps=1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    batches = iter([{"image": torch.rand(1, 1, 16, 16, 16, generator=gen),
                     "label": torch.randint(0, 13, (1, 1, 16, 16, 16), generator=gen)} for _ in range(2)])
    loss = train_steps(model, batches, make_loss({**eff, "network": spec}), opt, sched,
                       torch.amp.GradScaler("cuda", enabled=False), d.device, 2, amp=False)
    flat = torch.cat([p.detach().flatten() for p in unwrap(model).parameters()])
    torch.save({"flat": flat, "loss": loss}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_gloo_two_ranks_identical_weights(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["flat"], r1["flat"])
    assert r0["loss"] != r1["loss"]  # the ranks really saw different data
    torch.manual_seed(0)
    from flare.train.networks import build_network

    spec = {"name": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1, 1], "in_channels": 1,
            "out_channels": 13, "norm": "batch", "dsdepth": 2}
    init = torch.cat([p.detach().flatten() for p in build_network(spec).parameters()])
    assert not torch.equal(init, r0["flat"])  # and the steps changed the weights
