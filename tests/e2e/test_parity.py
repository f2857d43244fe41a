"""The runtime (ONNX Runtime CPU) against the MONAI/PyTorch reference in ``mirror`` mode on the same weights.

Real CTs from ../shared/data, the tiny locator and folds of ``tests/conftest.py``. The nets' last conv is
re-biased on a real CT (in a copy of the checkpoints, exported again) so that many classes appear and the locator
finds a real crop box: random weights alone predict background almost everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import data_path


def _compare(path: Path, bundle: Path, overlap: float | None = None) -> tuple[dict[int, float], dict]:
    from flare.benchmarks.metrics import dice_per_class
    from flare.benchmarks.reference import reference_segment
    from flare.runtime import segment

    result = segment(path, bundle=bundle, device="cpu", overlap=overlap)
    ours, affine, report = result.labels, result.affine, result.report.to_json()
    ref, ref_affine, ref_report = reference_segment(path, bundle, mode="mirror", device="cpu", overlap=overlap)
    assert ours.dtype == np.uint8 and ref.dtype == np.uint8
    assert ours.shape == ref.shape
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)
    assert report["crop"]["lo"] == ref_report["crop"]["lo"] and report["crop"]["hi"] == ref_report["crop"]["hi"]
    dice = dice_per_class(ours, ref)
    present = [k for k in dice if (ours == k).sum() + (ref == k).sum() > 50]
    assert len(present) >= 3, f"degenerate outputs on {path.name}: classes {sorted(dice)}"
    low = {k: round(dice[k], 4) for k in present if dice[k] < 0.99}
    assert not low, f"{path.name}: per-class Dice below 0.99: {low}"
    return dice, report


def test_parity_lps_torso(parity_bundle: Path) -> None:
    _compare(data_path("ts_torso_ct_1p5mm_lps.nii.gz"), parity_bundle)


def test_parity_int32_body(parity_bundle: Path) -> None:
    _compare(data_path("ts_body_ct_3mm_int32.nii.gz"), parity_bundle)


def test_parity_overlap_gaussian(parity_bundle: Path) -> None:
    _compare(data_path("ts_abdomen_ct_3mm.nii.gz"), parity_bundle, overlap=0.5)


def test_parity_four_level_folds_tile_with_divisor_8(parity_bundle4: Path) -> None:
    """4-level folds declare spatial_divisor 8: the runtime pads its tiles to multiples of 8 (not 16) and its labels
    still equal the MONAI reference's, which pads the same way."""
    _, report = _compare(data_path("ts_abdomen_ct_3mm.nii.gz"), parity_bundle4)
    roi = report["tiles"]["roi"]
    assert all(r % 8 == 0 for r in roi) and any(r % 16 for r in roi), roi
