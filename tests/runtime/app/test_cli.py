"""flare-run through the real console entry in a subprocess: success paths and every bad input of the issue.

Bad input must give exit code 2, exactly one line on stderr naming the file and the problem, no traceback and no
output file."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import assert_clean_failure, flare_run
from conftest import data_path


def _save(tmp: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = tmp / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _raw_header_file(tmp: Path, name: str, shape: tuple[int, ...], zooms: tuple[float, ...] | None = None,
                     payload: int = 64) -> Path:
    """An uncompressed .nii made of a header that claims ``shape`` and only ``payload`` bytes of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    if zooms is not None:
        hdr["pixdim"][1:4] = zooms
    hdr.set_sform(None, code=0)
    hdr.set_qform(None, code=0)
    path = tmp / name
    hdr["vox_offset"] = 352
    with open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * payload)
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    tmp = tmp_path_factory.mktemp("bad")
    small = np.zeros((20, 20, 20), np.int16)
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "text.nii.gz").write_text("this is not an image\n")
    (tmp / "text.nii").write_bytes(b"x" * 600)
    good = _save(tmp, "good.nii.gz", small)
    raw = good.read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    full = gzip.compress(nib.Nifti1Image(np.ones((40, 40, 40), np.int16), np.eye(4)).to_bytes())
    (tmp / "truncated_data.nii.gz").write_bytes(full[: len(full) // 3])
    (tmp / "folder.nii.gz").mkdir()
    return {
        "missing": (tmp / "missing.nii.gz", ("no such file",)),
        "folder": (tmp / "folder.nii.gz", ("folder",)),
        "empty": (tmp / "empty.nii.gz", ("empty",)),
        "not_gzip": (tmp / "text.nii.gz", ()),
        "not_nifti": (tmp / "text.nii", ("nifti",)),
        "truncated_gzip": (tmp / "truncated.nii.gz", ()),
        "truncated_data": (tmp / "truncated_data.nii.gz", ()),
        "two_d": (_save(tmp, "flat.nii.gz", np.zeros((20, 20), np.int16)), ("2-d",)),
        "four_d": (_save(tmp, "series.nii.gz", np.zeros((20, 20, 20, 3), np.int16)), ("volumes",)),
        "huge": (_raw_header_file(tmp, "huge.nii", (32000, 32000, 32000), (1.0, 1.0, 1.0)), ()),
        "zero_spacing": (_raw_header_file(tmp, "zero.nii", (8, 8, 8), (0.0, 1.0, 1.0), 8 * 8 * 8 * 2), ("spacing",)),
        "neg_spacing": (_raw_header_file(tmp, "neg.nii", (8, 8, 8), (1.0, -2.0, 1.0), 8 * 8 * 8 * 2), ("spacing",)),
        "nan_spacing": (_raw_header_file(tmp, "nan.nii", (8, 8, 8), (1.0, 1.0, np.nan), 8 * 8 * 8 * 2), ("spacing",)),
    }


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "not_gzip", "not_nifti", "truncated_gzip",
                                  "truncated_data", "two_d", "four_d", "huge", "zero_spacing", "neg_spacing",
                                  "nan_spacing"])
def test_bad_input(bad_inputs, tiny_bundle: Path, tmp_path: Path, case: str) -> None:
    path, words = bad_inputs[case]
    out = tmp_path / "out.nii.gz"
    proc = flare_run(path, "-o", out, "--bundle", tiny_bundle, "--quiet")
    assert_clean_failure(proc, path.name, *words)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bundle_problems(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    out = tmp_path / "out.nii.gz"
    proc = flare_run(ct, "-o", out, "--bundle", tmp_path / "nobundle", "-q")
    assert_clean_failure(proc, "nobundle", "does not exist")
    proc = flare_run(ct, "-o", out, "-q")  # default bundle from $FLARE_BUNDLE, missing
    assert_clean_failure(proc, "nonexistent-default-bundle")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "bundle.json").write_text("{")
    assert_clean_failure(flare_run(ct, "-o", out, "--bundle", broken, "-q"), "bundle.json", "parse")
    shutil.rmtree(broken)
    shutil.copytree(tiny_bundle, broken)
    with open(broken / "fold0.fp32.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    assert_clean_failure(flare_run(ct, "-o", out, "--bundle", broken, "-q"), "fold0.fp32.onnx", "sha256")
    assert not out.exists()


def test_output_problems(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    assert_clean_failure(flare_run(ct, "-o", tmp_path / "no" / "dir" / "o.nii.gz", "--bundle", tiny_bundle, "-q"),
                         "o.nii.gz", "does not exist")
    if os.geteuid() == 0:
        locked = Path("/sys/flare-out.nii.gz")  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        locked = ro / "o.nii.gz"
    assert_clean_failure(flare_run(ct, "-o", locked, "--bundle", tiny_bundle, "-q"), "flare-out.nii.gz"
                         if os.geteuid() == 0 else "o.nii.gz", "not writable")
    assert_clean_failure(flare_run(ct, "-o", tmp_path / "o.txt", "--bundle", tiny_bundle, "-q"), "o.txt")


def test_run_writes_labels_and_report(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_torso_ct_1p5mm_lps.nii.gz")
    out, rep = tmp_path / "seg.nii.gz", tmp_path / "report.json"
    proc = flare_run(ct, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "--report", rep)
    assert proc.returncode == 0, proc.stderr
    src, seg = nib.load(ct), nib.load(out)
    assert seg.shape == src.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(seg.header.get_sform(), src.header.get_sform(), atol=1e-5)
    np.testing.assert_allclose(seg.header.get_qform(), src.header.get_qform(), atol=1e-5)
    assert int(seg.header["sform_code"]) == int(src.header["sform_code"])
    report = json.loads(rep.read_text())
    assert set(report["stages"]) == {"read", "locate", "crop_resample", "infer", "postprocess", "restore", "write"}
    assert report["input"]["orientation"] == "LPS" and report["folds"] == 2 and report["gpu_peak_mb"] is None
    assert report["postprocess"] == {"mode": "paper"}  # the bundle's default
    for key in ("crop", "tiles", "backend", "total_s", "rss_peak_mb"):
        assert key in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "seg.nii.gz"]  # no temp files left


def test_precision_the_bundle_lacks_is_said(tiny_bundle: Path, tmp_path: Path) -> None:
    """--precision fp16 of an fp32-only bundle runs fp32 (as before) and now says so; int8 is refused."""
    ct, out = data_path("ts_abdomen_ct_3mm.nii.gz"), tmp_path / "seg.nii.gz"
    proc = flare_run(ct, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "--precision", "fp16")
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    assert "flare-run: note: --precision fp16: the bundle has no fp16 models; running fp32" in proc.stderr
    assert "note" not in flare_run(ct, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "--precision",
                                   "fp32").stderr


def test_postprocess_option(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    out, rep = tmp_path / "seg.nii.gz", tmp_path / "report.json"
    proc = flare_run(ct, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "--postprocess", "strict",
                     "--report", rep, "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rep.read_text())["postprocess"] == {"mode": "strict"}
    bad = flare_run(ct, "-o", tmp_path / "x.nii.gz", "--bundle", tiny_bundle, "--postprocess", "loose", "-q")
    assert bad.returncode == 2 and "paper" in bad.stderr and "strict" in bad.stderr
    assert not (tmp_path / "x.nii.gz").exists()
    assert "--postprocess" in flare_run("--help").stdout


def test_help_is_fast_and_torch_free() -> None:
    code = ("import sys, runpy; sys.argv=['flare-run','--help'];\n"
            "try:\n    runpy.run_module('flare.runtime.app.cli', run_name='__main__')\nexcept SystemExit: pass\n"
            "bad=[m for m in ('torch','monai','onnxruntime','scipy') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--bundle" in proc.stdout


def test_ts_argv_reads_totalsegmentator_habits() -> None:
    from flare.runtime.app.cli import ts_argv
    from flare.runtime.app.plan import BESIDE_OUTPUT

    beside = str(BESIDE_OUTPUT)
    assert ts_argv(["-i", "ct.nii.gz", "--roi_subset", "liver", "kidney_left", "-o", "x.nii.gz"]) == [
        "-i", "ct.nii.gz", "--roi-subset", "liver", "--roi-subset", "kidney_left", "-o", "x.nii.gz"]
    # names end at the first word that is not a label name (an INPUT after the option)
    assert ts_argv(["--roi-subset", "spleen", "ct.nii.gz"]) == ["--roi-subset", "spleen", "ct.nii.gz"]
    assert ts_argv(["--roi-subset", "colon"]) == ["--roi-subset", "colon"]  # unknown: the plan's error
    assert ts_argv(["ct.nii.gz", "--statistics"]) == ["ct.nii.gz", "--statistics", beside]
    assert ts_argv(["--statistics", "-o", "x"]) == ["--statistics", beside, "-o", "x"]
    assert ts_argv(["--statistics", "ct.nii.gz"]) == ["--statistics", beside, "ct.nii.gz"]
    assert ts_argv(["--statistics", "s.json"]) == ["--statistics", "s.json"]
    assert ts_argv(["--", "--statistics"]) == ["--", "--statistics"]
    assert ts_argv(["-ot", "dicom_rtstruct"]) == ["--format", "rtstruct"]
    assert ts_argv(["--output_type", "dicom_seg"]) == ["--format", "dicom-seg"]


def test_device_names() -> None:
    from flare.runtime.foundation.errors import FlareError
    from flare.runtime.inference.device import parse_device

    assert parse_device("gpu") == ("cuda", None) and parse_device("GPU:1") == ("cuda", 1)
    assert parse_device("cuda:0") == ("cuda", 0) and parse_device("cpu") == ("cpu", None)
    for bad in ("cpu:1", "cuda:", "cuda:-1", "auto:0", "mps"):
        with pytest.raises(FlareError, match="unknown device"):
            parse_device(bad)


def test_gpu_options_are_checked_on_any_device(tiny_bundle: Path, tmp_path: Path) -> None:
    """--cudnn-algo-search and --gpu-mem-budget are validated before anything runs, also on a CPU machine (a bogus
    search and an infinite budget were accepted and ignored)."""
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    for args in (["--cudnn-algo-search", "bogus"], ["--gpu-mem-budget", "inf"]):
        proc = flare_run(ct, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "--device", "cpu", *args)
        assert proc.returncode == 2 and "Invalid value" in proc.stderr, (args, proc.stderr)
    proc = flare_run(ct, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "--device", "cpu",
                     "--cudnn-algo-search", "exhaustive", "-q")
    assert proc.returncode == 0, proc.stderr
