"""Property-based contract of ``flare-run`` on generated NIfTI headers (Hypothesis).

Headers are generated field by field — dimensions (0, negative, huge, 2-D, 4-D+), pixdim (0, NaN, inf, negative,
tiny, huge), qform/sform codes, oblique, singular and non-finite affines, quaternions out of range, data types
(supported, unsupported, unknown codes), ``scl_slope``/``scl_inter`` (0, NaN, inf, huge), NIfTI-1 and NIfTI-2,
gzip or not, full or truncated voxel data — and every file is run through the CLI's ``app`` in-process. The
contract: exit 0 with a label map of the input's shape and affine, or exit 2 with exactly one line naming the
file; never a traceback, never an output file on failure, and never more than the memory cap (numpy allocations
are traced with ``tracemalloc``; the grid limit is lowered to 64 MiB so that the cap is meaningful and each run is
fast). Reproducible: ``derandomize=True``, no example database.
"""

from __future__ import annotations

import gzip
import math
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GRID_LIMIT = 64 * 2**20
MEMORY_CAP = 12 * GRID_LIMIT  # every live grid at the limit at once, with room to spare
NAN, INF = float("nan"), float("inf")
SPECIAL_FLOATS = [0.0, NAN, INF, -INF, -1.5, 1e-30, 1e20, 150.0, 3.0e38]
_CACHE: dict[str, object] = {}


FAULTS = {
    "ndim": [0, 2, 8, -1],
    "extra_dims": [[1], [1, 1], [2], [1, 2]],
    "size": [0, -3, "big"],
    "spacing": SPECIAL_FLOATS,
    "qfac": [0.0, 2.0],
    "datatype": [32, 128, 1536, 1792, 2048, 2304, 0, 999],
    "slope": [0.0, NAN, INF, 1e30],
    "inter": [NAN, 1e38],
    "qform_code": [7, -1],
    "sform_code": [-1, 9],
    "angle": [NAN, INF],
    "singular": [True],
    "quatern": [(0.9, 0.9, 0.9), (NAN, 0.0, 0.0)],
    "truncate": [True],
    "non_finite_data": [NAN, INF],
}
"""Faults injected into an otherwise plausible header (up to three per example; none in some examples)."""


@st.composite
def headers(draw: st.DrawFn) -> dict:
    """A plausible small CT header (valid fields), then 0-3 faults from :data:`FAULTS`."""
    h = {
        "nifti2": draw(st.booleans()),
        "dim": [3] + [draw(st.integers(1, 20)) for _ in range(3)],
        "pixdim": [draw(st.sampled_from([1.0, -1.0]))] + [draw(st.floats(0.4, 9.0)) for _ in range(3)],
        "datatype": draw(st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280])),
        "slope": draw(st.sampled_from([1.0, 2.5, -1.0])),
        "inter": draw(st.sampled_from([0.0, -1024.0])),
        "qform_code": draw(st.sampled_from([0, 1, 2])),
        "sform_code": draw(st.sampled_from([0, 1, 4])),
        "angle": draw(st.sampled_from([0.0, 0.3, math.pi / 2])),
        "singular": False,
        "quatern": draw(st.sampled_from([(0.0, 0.0, 0.0), (0.1, 0.2, 0.3)])),
        "gzip": draw(st.booleans()),
        "truncate": False,
        "non_finite_data": None,
        "seed": draw(st.integers(0, 2**16)),
    }
    for fault in draw(st.lists(st.sampled_from(sorted(FAULTS)), max_size=3, unique=True)):
        value = draw(st.sampled_from(FAULTS[fault]))
        if fault == "ndim":
            h["dim"][0] = value
        elif fault == "extra_dims":
            h["dim"] = [3 + len(value), *h["dim"][1:4], *value]
        elif fault == "size":
            h["dim"][draw(st.integers(1, 3))] = (2**40 if h["nifti2"] else 2**15 - 1) if value == "big" else value
        elif fault == "spacing":
            h["pixdim"][draw(st.integers(1, 3))] = value
        elif fault == "qfac":
            h["pixdim"][0] = value
        else:
            h[fault] = value
    return h


def _write(path: Path, h: dict) -> None:
    klass = nib.Nifti2Header if h["nifti2"] else nib.Nifti1Header
    hdr = klass()
    dim = np.zeros(8, dtype=np.int64)
    dim[: len(h["dim"])] = h["dim"]
    dim[len(h["dim"]):] = 1
    pixdim = np.ones(8)
    pixdim[:4] = h["pixdim"]
    hdr["dim"] = dim
    hdr["pixdim"] = pixdim
    hdr["datatype"] = h["datatype"]
    hdr["bitpix"] = 8 * {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8}.get(h["datatype"], 1)
    hdr["scl_slope"], hdr["scl_inter"] = h["slope"], h["inter"]
    hdr["qform_code"], hdr["sform_code"] = h["qform_code"], h["sform_code"]
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = h["quatern"]
    with np.errstate(invalid="ignore"):
        c, s = np.cos(h["angle"]), np.sin(h["angle"])  # NaN for a non-finite angle (a fault)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) * np.abs(np.nan_to_num(h["pixdim"][1:4]))
    if h["singular"]:
        rot[:, 2] = 0.0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [[*rot[i], -10.0 * i] for i in range(3)]
    offset = hdr.template_dtype.itemsize + 4
    hdr["vox_offset"] = offset
    n_vox = math.prod(max(int(d), 0) for d in h["dim"][1:4]) if h["dim"][0] >= 1 else 0
    needed = n_vox * int(hdr["bitpix"]) // 8
    size = min(needed, 4096) if h["truncate"] or needed > 4_000_000 else needed
    if h["truncate"]:
        size //= 2
    payload = np.random.default_rng(h["seed"]).integers(0, 256, size, dtype=np.uint8)
    if h["datatype"] in (16, 64):  # floats: mostly finite CT-like values, some NaN/inf from the random bytes
        values = np.random.default_rng(h["seed"]).normal(0, 300, size // 4).astype(np.float32)
        if h["non_finite_data"] is not None:
            values[::3] = h["non_finite_data"]
        payload = values.view(np.uint8) if h["datatype"] == 16 else values.astype(np.float64).view(np.uint8)[:size]
    raw = hdr.binaryblock + b"\0" * 4 + payload.tobytes()
    path.write_bytes(gzip.compress(raw, 1) if h["gzip"] else raw)


def _runner_app():
    if "app" not in _CACHE:
        from flare.runtime.app.cli import app
        from typer.testing import CliRunner

        _CACHE["app"], _CACHE["runner"] = app, CliRunner()
    return _CACHE["app"], _CACHE["runner"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # huge values into float32 fields
@settings(max_examples=80, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(h=headers())
def test_generated_headers_contract(h: dict, tiny_bundle: Path, workdir: Path, monkeypatch) -> None:
    from flare.runtime.image.nifti import read_image

    monkeypatch.setenv("FLARE_MAX_GRID_BYTES", str(GRID_LIMIT))
    src = workdir / ("case.nii.gz" if h["gzip"] else "case.nii")
    out = workdir / "seg.nii.gz"
    out.unlink(missing_ok=True)
    _write(src, h)
    app, runner = _runner_app()
    tracemalloc.start()
    try:
        result = runner.invoke(app, [str(src), "-o", str(out), "--bundle", str(tiny_bundle), "-q"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output = (result.stdout or "") + (result.stderr or "")
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert peak < MEMORY_CAP, f"numpy peak {peak / 2**20:.0f} MiB"
    if result.exit_code == 0:
        img, seg = read_image(src), nib.load(out)
        assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
        assert seg.get_data_dtype() == np.uint8 and int(np.asanyarray(seg.dataobj).max()) <= 14
    else:
        assert result.exit_code == 2, (result.exit_code, output)
        errors = [ln for ln in result.stderr.splitlines() if "warning" not in ln]
        assert len(errors) == 1 and str(src) in errors[0], result.stderr
        assert not out.exists()
