"""Tile plans and tiled inference against MONAI's sliding_window_inference (the oracle) on the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flare.runtime.bundle.manifest import load_bundle
from flare.runtime.inference.engines import create_engine
from flare.runtime.inference.ensemble import abdominal_z_range, infer_ensemble
from flare.runtime.inference.tiling import effective_roi, importance_map, plan_tiles
from parity_support import fold_major


@pytest.mark.parametrize("shape, roi, overlap", [
    ((100, 90, 37), (32, 32, 32), 0.0), ((64, 64, 64), (64, 64, 64), 0.0), ((130, 70, 40), (48, 32, 16), 0.5),
    ((20, 20, 20), (32, 32, 32), 0.25), ((224, 300, 96), (224, 224, 96), 0.625),
])
def test_plan_matches_monai(shape, roi, overlap) -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    plan = plan_tiles(shape, roi, overlap)
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    interval = _get_scan_interval(padded, roi, 3, (overlap,) * 3)
    expected = sorted(tuple(s.start for s in sl) for sl in dense_patch_slices(padded, roi, interval))
    assert sorted(plan.starts) == expected
    covered = np.zeros(plan.padded_shape, bool)
    for start in plan.starts:
        covered[plan.slices(start)] = True
    assert covered.all()


def test_effective_roi_and_importance() -> None:
    assert effective_roi((30, 500, 224), (224, 224, 224)) == (32, 224, 224)
    with pytest.raises(ValueError):
        effective_roi((30, 30, 30), (20, 32, 32))
    g = importance_map((32, 16, 48), "gaussian")
    assert g.shape == (32, 16, 48) and g.max() == pytest.approx(1.0, abs=1e-3) and g.min() >= 1e-3
    assert (importance_map((16, 16, 16)) == 1).all()


def _torch_fold(ckpt: Path):
    from flare.train.checkpoints import load_network

    return load_network(ckpt)[0]


@pytest.mark.parametrize("shape, overlap, mode", [((70, 50, 40), 0.0, "constant"), ((40, 90, 30), 0.5, "gaussian")])
def test_sliding_window_matches_monai(tiny_bundle: Path, tiny_checkpoints: Path, shape, overlap, mode) -> None:
    import torch
    from monai.inferers import sliding_window_inference

    engine = create_engine(load_bundle(tiny_bundle).folds[0], "cpu")
    net = _torch_fold(tiny_checkpoints / "fold0")
    vol = np.random.default_rng(1).random(shape, dtype=np.float32)
    roi = (64, 64, 64)
    out = np.zeros((13,) + shape, np.float32)
    plan = fold_major(vol, engine, roi, out, overlap=overlap, blend=mode)
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(vol)[None, None], plan.roi, 1,
                                       lambda x: torch.softmax(net(x), 1), overlap=overlap, mode=mode,
                                       sigma_scale=0.125)[0].numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)
    tol = 1e-4 if mode == "constant" else 2e-2  # MONAI's Gaussian kernel is a discretised filter, ours analytic
    assert np.abs(out - ref).max() < tol
    assert (out.argmax(0) == ref.argmax(0)).mean() > 0.99


def test_abdominal_z_range_rules() -> None:
    labels = np.zeros((10, 10, 100), np.uint8)
    labels[4:6, 4:6, 40:60] = 1
    assert abdominal_z_range(labels, spacing_z=1.0) == (30, 70)
    labels[5, 5, 65] = 12  # tumor inside the widened range
    assert abdominal_z_range(labels, 1.0) == (30, 70)
    labels[5, 5, 90] = 12  # tumor outside: no crop
    assert abdominal_z_range(labels, 1.0) is None
    assert abdominal_z_range(np.zeros((4, 4, 4), np.uint8), 1.0) is None


def test_ensemble_two_folds_is_mean_of_folds(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    engines = [create_engine(f, "cpu") for f in b.folds]
    vol = np.random.default_rng(2).random((40, 40, 70), dtype=np.float32)
    res = infer_ensemble(vol, engines, (64, 64, 64), z_crop=False)
    acc = np.zeros((13,) + vol.shape, np.float32)
    for e in engines:
        fold_major(vol, e, (64, 64, 64), acc)
    assert res.labels.dtype == np.uint8 and (res.labels == acc.argmax(0)).all()
    assert res.folds == 2 and res.z_range is None
