"""``train.cpu_bf16``: bf16 autocast for the forward passes of training on the CPU (off by default: not in the paper,
which trains with fp16 AMP on GPUs). The weights, the optimiser and the loss stay fp32."""

from __future__ import annotations

import pytest
import torch
from flare.train.config import load_config, role_config
from flare.train.engine import autocast, make_loss, make_optimizer, predict_logits, train_steps
from flare.train.networks import build_network

CPU = torch.device("cpu")


def _eff(cpu_bf16: bool | None) -> dict:
    eff = role_config(load_config("tiny"), "fold")
    eff["network"] = {**eff["network"], "init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2}
    if cpu_bf16 is not None:
        eff["train"] = {**eff["train"], "cpu_bf16": cpu_bf16}
    return eff


@pytest.mark.parametrize(("cpu_bf16", "dtype"), [(None, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_forward_precision(cpu_bf16: bool | None, dtype: torch.dtype) -> None:
    eff = _eff(cpu_bf16)
    conv = torch.nn.Conv3d(1, 2, 3)
    with autocast(CPU, eff):
        out = conv(torch.rand(1, 1, 8, 8, 8))
    assert out.dtype == dtype


def test_amp_alone_leaves_the_cpu_in_fp32() -> None:
    """``train.amp`` is the paper's CUDA AMP; on the CPU it changes nothing."""
    eff = _eff(None)
    eff["train"] = {**eff["train"], "amp": True}
    with autocast(CPU, eff):
        assert torch.nn.Linear(2, 2)(torch.rand(1, 2)).dtype == torch.float32


def test_bf16_training_steps_and_inference() -> None:
    """A real network trains two steps with bf16 forward passes: finite loss, fp32 weights that moved; its
    sliding-window logits come back as fp32."""
    eff = _eff(True)
    torch.manual_seed(0)
    net = build_network(eff["network"])
    before = [p.detach().clone() for p in net.parameters()]
    opt, sched = make_optimizer(net, eff, total_steps=4, warmup_steps=1)
    gen = torch.Generator().manual_seed(1)
    batches = iter([{"image": torch.rand(1, 1, 16, 16, 16, generator=gen),
                     "label": torch.randint(0, 13, (1, 1, 16, 16, 16), generator=gen)} for _ in range(2)])
    loss = train_steps(net, batches, make_loss(eff), opt, sched, torch.amp.GradScaler("cuda", enabled=False), CPU, 2,
                       eff)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, net.parameters(), strict=True))
    eff["validation"] = {**eff.get("validation", {}), "roi": [16, 16, 16]}
    logits = predict_logits(net, torch.rand(1, 20, 18, 16).numpy(), eff, CPU)
    assert logits.dtype == torch.float32 and tuple(logits.shape[-3:]) == (20, 18, 16)


def test_config_refuses_a_non_boolean(tmp_path) -> None:
    import json

    from flare.runtime.foundation.errors import InputError

    cfg = load_config("tiny")
    cfg["train"]["cpu_bf16"] = "yes"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="train.cpu_bf16: 'yes' is not of type 'boolean'"):
        load_config(str(path))
