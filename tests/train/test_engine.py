"""Whole-case prediction streams along z: slabs cover the volume once, and labels do not depend on the slab size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flare.train.config import load_config
from flare.train.engine import make_loss, segment, z_slabs


@pytest.mark.parametrize("z", [1, 31, 32, 100, 257])
def test_z_slabs_cover_the_volume_once_with_context(z: int) -> None:
    slabs = z_slabs((40, 40, z), channels=13, roi_z=32, slab_mb=0.5)
    kept = np.zeros(z, int)
    for z0, z1, c0, c1 in slabs:
        kept[z0:z1] += 1
        assert c0 <= z0 < z1 <= c1 and c0 >= 0 and c1 <= z
        assert z0 - c0 in (z0, 16) and c1 - z1 in (z - z1, 16)  # half a roi of context where the volume has it
    assert np.all(kept == 1)
    assert z_slabs((40, 40, z), 13, 32, slab_mb=1e6) == [(0, z, 0, z)]  # fits: one slab, the whole volume


def test_segment_by_slabs_equals_whole_volume() -> None:
    """A pointwise network sees no context, so streaming in small slabs must give exactly the whole-volume labels;
    the ensemble path (mean softmax) as well as the single-network argmax."""
    torch.manual_seed(0)
    nets = [torch.nn.Conv3d(1, 13, 1).eval() for _ in range(2)]
    image = torch.rand(1, 20, 18, 70)
    eff = {"network": {"out_channels": 13}, "roi": [16, 16, 16], "train": {"amp": False},
           "validation": {"overlap": 0.0, "sw_batch_size": 2}}
    whole = {**eff, "validation": {**eff["validation"], "slab_mb": 1e6}}
    slabbed = {**eff, "validation": {**eff["validation"], "slab_mb": 0.1}}
    assert len(z_slabs((20, 18, 70), 13, 16, 0.1)) > 1
    for n in (1, 2):
        a = segment(nets[:n], image, whole, torch.device("cpu"))
        b = segment(nets[:n], image, slabbed, torch.device("cpu"))
        assert a.dtype == np.uint8 and a.shape == (20, 18, 70)
        assert np.array_equal(a, b) and len(np.unique(a)) > 1


def test_class_weights_scale_a_class_in_the_loss() -> None:
    """``train.class_weights`` (MONAI's ``weight``, for the cross-entropy and Dice terms): raising one class's weight
    raises the loss where that class is mispredicted; the weight reaches both terms; a wrong length is refused."""
    torch.manual_seed(0)
    logits = [torch.randn(2, 13, 8, 8, 8)]
    with_7 = torch.randint(0, 13, (2, 1, 8, 8, 8))
    w = [1.0] * 13
    w[7] = 5.0
    plain = make_loss(load_config("tiny"))  # DiceCE without class weights (demo has its own weights)
    weighted = make_loss(load_config("tiny", {"train": {"class_weights": w}}))
    assert plain.loss.cross_entropy.weight is None
    assert float(weighted(logits, with_7)) > float(plain(logits, with_7))
    assert weighted.loss.cross_entropy.weight[7] == 5.0 and weighted.loss.dice.class_weight[7] == 5.0
    with pytest.raises(ValueError, match="13 positive numbers"):
        make_loss(load_config("tiny", {"train": {"class_weights": [1.0, 2.0]}}))


def test_whole_case_prediction_uses_the_inference_tile() -> None:
    """``validation.roi`` (not the training crop ``roi``) is the sliding window of whole-case prediction."""
    seen: list[tuple[int, ...]] = []

    class Probe(torch.nn.Conv3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape[2:]))
            return super().forward(x)

    net = Probe(1, 13, 1).eval()
    eff = {"network": {"out_channels": 13}, "roi": [16, 16, 16], "train": {"amp": False},
           "validation": {"overlap": 0.0, "sw_batch_size": 1, "roi": [32, 32, 32]}}
    segment([net], torch.rand(1, 32, 32, 32), eff, torch.device("cpu"))
    assert seen == [(32, 32, 32)]
    seen.clear()
    segment([net], torch.rand(1, 32, 32, 32), {**eff, "validation": {"overlap": 0.0}}, torch.device("cpu"))
    assert seen and set(seen) == {(16, 16, 16)}


def test_torch_setup_sleeps_idle_openmp_threads_when_another_process_keeps_a_core_busy() -> None:
    """The wait policy follows the load measured now (``/proc/stat``), not the 1-minute average: with a process
    spinning on one core, a fresh process's ``torch_setup`` picks ``OMP_WAIT_POLICY=PASSIVE``."""
    import os
    import subprocess
    import sys

    from flare.train.engine import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cores() >= 0.5
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        code = ("import os; from flare.train.engine import torch_setup; torch_setup(2); "
                "print(os.environ.get('OMP_WAIT_POLICY'))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "PASSIVE"
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.0 <= busy_cores(0.1) <= (os.cpu_count() or 1) + 0.01
