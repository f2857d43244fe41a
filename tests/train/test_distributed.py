"""Two gloo processes run DistributedDataParallel steps of a tiny net and end with identical weights."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from ddp_workers import fit_worker, step_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_gloo_two_ranks_identical_weights(tmp_path: Path) -> None:
    mp.spawn(step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
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


def test_ddp_fit_distributed_sampler_sharded_validation(tmp_path: Path) -> None:
    """``fit`` on 2 gloo ranks: DistributedSampler, validation sharded (2 + 1 of 3 cases) and reduced to the same
    metric on both ranks, identical final weights, one shared disk cache."""
    from flare.train.phantoms import make_phantoms

    make_phantoms(tmp_path / "ph", 5, seed=4, size=48, holdout=0, folds=2)
    mp.spawn(fit_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path / "ph")), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "fit0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "fit1.pt", weights_only=False)
    assert r0["sampler"] == r1["sampler"] == "DistributedSampler"
    assert torch.equal(r0["flat"], r1["flat"])
    assert (r0["here"], r1["here"]) == (2, 1) and r0["best"] == r1["best"] and r0["per_class"] == r1["per_class"]
    assert r0["losses"] != r1["losses"]  # each rank trained on its own shard
    assert (tmp_path / "fold0" / "model.pt").is_file() and (tmp_path / "fold0" / "done.json").is_file()
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 5 + 3  # training cases + validation cases, once each
