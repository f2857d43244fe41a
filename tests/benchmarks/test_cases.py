"""Benchmark cases built from the real CTs in ../shared/data (small versions of the FLARE-size specs)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from flare.benchmarks.cases import SYNTHETIC, CaseSpec, build_case, resolve_cases, synthetic_cases
from flare.runtime.foundation.errors import InputError


def test_synthetic_specs_are_flare_size() -> None:
    assert [s.shape for s in SYNTHETIC] == [(512, 512, 100), (512, 512, 300), (512, 512, 550)]
    for s in SYNTHETIC:
        assert 0.75 <= s.spacing[0] <= 0.8 and 1.25 <= s.spacing[2] <= 2.5


def test_build_case_keeps_orientation_pads_with_air(tmp_path: Path) -> None:
    src = data_path("ts_torso_ct_1p5mm_lps.nii.gz")
    spec = CaseSpec("small_lps", ("torso",), (3.2, 3.2, 5.0), (80, 80, 60))
    out = build_case(spec, tmp_path / "c.nii.gz", src.parent)
    img = nib.load(str(out))
    assert img.shape == (80, 80, 60)
    assert img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (3.2, 3.2, 5.0), rtol=1e-5)
    data = np.asarray(img.dataobj)
    assert data[0, 0, 0] == -1024  # air padding
    assert data.max() > 200  # real anatomy (bone/contrast) survived the resampling
    # 120 * 1.5 / 3.2 = 56 voxels of anatomy, centred in 80
    assert (data[:, 40, 30] > -1000).sum() <= 56


def test_stacked_case_and_cache(tmp_path: Path) -> None:
    src = data_path("ts_abdomen_ct_3mm.nii.gz").parent
    spec = CaseSpec("small_stack", ("body", "abdomen"), (6.0, 6.0, 6.0), (64, 64, 80))
    paths = synthetic_cases(tmp_path, src, specs=[spec])
    assert len(paths) == 1 and paths[0].is_file()
    img = nib.load(str(paths[0]))
    assert img.shape == (64, 64, 80) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    mtime = paths[0].stat().st_mtime_ns
    assert synthetic_cases(tmp_path, src, specs=[spec]) == paths and paths[0].stat().st_mtime_ns == mtime


def test_resolve_cases(tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    assert resolve_cases(str(ct)) == [ct]
    assert resolve_cases([ct]) == [ct]
    assert ct in resolve_cases(str(ct.parent))
    with pytest.raises(InputError, match="no .nii.gz"):
        resolve_cases(str(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        resolve_cases(str(tmp_path / "missing"))
