"""The DDP test's worker processes (a plain module on the test path: spawned children import it by name, which they
cannot do for a test module imported by pytest's importlib mode)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def step_worker(rank: int, world: int, port: int, out: str) -> None:
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
                       torch.amp.GradScaler("cuda", enabled=False), d.device, 2,
                       {**eff, "train": {**eff["train"], "amp": False}})
    flat = torch.cat([p.detach().flatten() for p in unwrap(model).parameters()])
    torch.save({"flat": flat, "loss": loss}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def fit_worker(rank: int, world: int, port: int, out: str, phantoms: str) -> None:
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
    entries = [{**e, "label": e["label_full"]} for e in load_datalist(phantoms, include_unlabelled=True)["training"]]
    res = fit(load_config("tiny", fast), "fold", entries, entries[:3], Path(out) / "fold0", fold=0, stage=1, dist=d,
              cache_dir=Path(out) / "cache")
    flat = torch.cat([p.detach().flatten() for p in res["net"].parameters()])
    torch.save({"flat": flat, "best": res["best_metric"], "per_class": res["val_per_class"],
                "here": res["val_cases_this_rank"], "sampler": res["sampler"], "losses": res["losses"]},
               Path(out) / f"fit{rank}.pt")
    dist.destroy_process_group()
