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


def _fit_worker(rank: int, world: int, port: int, out: str, phantoms: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist
    from flare.train.config import load_config
    from flare.train.datalist import load_datalist
    from flare.train.distributed import setup
    from flare.train.engine import fit

    torch.set_num_threads(1)
    d = setup(timeout_min=5)
    fast = {"spacing_mm": [8.0, 8.0, 8.0], "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2},
            "train": {"epochs": 2, "steps_per_epoch": 2, "val_every": 1, "num_workers": 0}}
    entries = [{**e, "label": e["label_full"]} for e in load_datalist(phantoms)["training"]]
    res = fit(load_config("tiny", fast), "fold", entries, entries[:3], Path(out) / "fold0", fold=0, stage=1, dist=d,
              cache_dir=Path(out) / "cache")
    flat = torch.cat([p.detach().flatten() for p in res["net"].parameters()])
    torch.save({"flat": flat, "best": res["best_metric"], "per_class": res["val_per_class"],
                "here": res["val_cases_this_rank"], "sampler": res["sampler"], "losses": res["losses"]},
               Path(out) / f"fit{rank}.pt")
    dist.destroy_process_group()


def test_ddp_fit_distributed_sampler_sharded_validation(tmp_path: Path) -> None:
    """``fit`` on 2 gloo ranks: DistributedSampler, validation sharded (2 + 1 of 3 cases) and reduced to the same
    metric on both ranks, identical final weights, one shared disk cache."""
    from flare.train.phantoms import make_phantoms

    make_phantoms(tmp_path / "ph", 5, seed=4, size=48, holdout=0, folds=2)
    mp.spawn(_fit_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path / "ph")), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "fit0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "fit1.pt", weights_only=False)
    assert r0["sampler"] == r1["sampler"] == "DistributedSampler"
    assert torch.equal(r0["flat"], r1["flat"])
    assert (r0["here"], r1["here"]) == (2, 1) and r0["best"] == r1["best"] and r0["per_class"] == r1["per_class"]
    assert r0["losses"] != r1["losses"]  # each rank trained on its own shard
    assert (tmp_path / "fold0" / "model.pt").is_file() and (tmp_path / "fold0" / "done.json").is_file()
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 5 + 3  # training cases + validation cases, once each
