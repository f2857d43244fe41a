"""One training step of the flare23 recipe at 224³ with AMP on a GPU (records step time and peak memory)."""

from __future__ import annotations

import time

import pytest
import torch
from flare.train.config import load_config, role_config
from flare.train.engine import make_loss, make_optimizer, train_steps
from flare.train.networks import build_network


@pytest.mark.gpu
def test_flare23_step_224_amp() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    eff = role_config(load_config("flare23"), "fold")
    dev = torch.device("cuda")
    net = build_network(eff["network"]).to(dev)
    opt, sched = make_optimizer(net, eff, total_steps=10, warmup_steps=1)
    gen = torch.Generator().manual_seed(0)
    batches = iter([{"image": torch.rand(1, 1, 224, 224, 224, generator=gen),
                     "label": torch.randint(0, 13, (1, 1, 224, 224, 224), generator=gen)} for _ in range(3)])
    scaler = torch.amp.GradScaler("cuda")
    loss_fn = make_loss(eff)
    train_steps(net, batches, loss_fn, opt, sched, scaler, dev, 1, {**eff, "train": {**eff["train"], "amp": True}})  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    loss = train_steps(net, batches, loss_fn, opt, sched, scaler, dev, 2, {**eff, "train": {**eff["train"], "amp": True}})
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / 2
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    print(f"flare23 224^3 AMP training step: {step_s:.3f} s, peak allocated {peak_gb:.1f} GB, "
          f"{torch.cuda.get_device_name()}")
    assert torch.isfinite(torch.tensor(loss))
