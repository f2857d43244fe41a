"""flare-run with int8 models on a real CT: the CPU default when the bundle has them (with a one-line note),
``--precision int8``, the bundle's ``profile``, and the one-line errors of int8 where it cannot run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import assert_clean_failure, flare_run
from conftest import data_path


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    """``tiny_bundle`` plus static int8 models (calibrated on a real CT; random weights, so no accuracy gate here:
    tests/export/test_quantize.py tests the gate) and ``profile: cpu``."""
    from flare.export.quantize import case_tiles, case_volume, quantize_file
    from flare.runtime.bundle.manifest import sha256_file, write_bundle_json

    root = tmp_path_factory.mktemp("int8_run") / "bundle"
    shutil.copytree(tiny_bundle, root)
    doc = json.loads((root / "bundle.json").read_text())
    ct = data_path("ts_body_ct_3mm_int32.nii.gz")
    for entry, spacing in [(doc["locator"], doc["preprocessing"]["locator_spacing_mm"])] + \
            [(f, doc["preprocessing"]["spacing_mm"]) for f in doc["folds"]]:
        tiles = case_tiles(case_volume(ct, spacing, (-250.0, 250.0)), 1, side=32, max_tiles=2)
        dst = quantize_file(root / entry["files"]["fp32"]["path"], root / f"{entry['name']}.int8.onnx", tiles, [])
        entry["files"]["int8"] = {**entry["files"]["fp32"], "path": dst.name, "sha256": sha256_file(dst)}
    doc["profile"] = "cpu"
    write_bundle_json(root, doc)
    return root


def test_int8_is_the_cpu_default_with_a_note(int8_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    out8, rep8 = tmp_path / "int8.nii.gz", tmp_path / "int8.json"
    proc = flare_run(ct, "-o", out8, "--bundle", int8_bundle, "--device", "cpu", "--report", rep8)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "int8" in notes[0] and "--precision fp32" in notes[0]
    report = json.loads(rep8.read_text())
    assert report["backend"]["precision"] == "int8" and report["backend"]["profile"] == "cpu"
    out32, rep32 = tmp_path / "fp32.nii.gz", tmp_path / "fp32.json"
    proc = flare_run(ct, "-o", out32, "--bundle", int8_bundle, "--device", "cpu", "--precision", "fp32",
                     "--report", rep32, "-q")
    assert proc.returncode == 0 and "note:" not in proc.stderr, proc.stderr
    assert json.loads(rep32.read_text())["backend"]["precision"] == "fp32"
    a, b = (np.asarray(nib.load(p).dataobj) for p in (out8, out32))
    assert a.shape == b.shape == nib.load(ct).shape and a.dtype == np.uint8
    assert (a == b).mean() > 0.5  # random weights: int8 and fp32 agree on most voxels, not all


def test_int8_without_int8_models_is_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    proc = flare_run(data_path("ts_abdomen_ct_3mm.nii.gz"), "-o", out, "--bundle", tiny_bundle, "--device", "cpu",
                     "--precision", "int8")
    assert_clean_failure(proc, str(tiny_bundle), "has no int8 models", "flare-export --int8")
    assert not out.exists()


def test_default_precision_per_device(int8_bundle: Path, tiny_bundle: Path) -> None:
    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.inference.engines import EngineError, create_engine, default_precision

    with_int8, without = load_bundle(int8_bundle), load_bundle(tiny_bundle)
    assert with_int8.precisions == ("fp32", "int8") and with_int8.profile == "cpu" and without.profile == "gpu"
    spec = with_int8.folds[0]
    assert default_precision(spec, "cpu") == "int8" and default_precision(spec, "cuda") == "fp32"
    assert default_precision(without.folds[0], "cpu") == "fp32"
    engine = create_engine(spec, "cpu")
    assert engine.precision == "int8" and engine.run(np.zeros((1, 1, 32, 32, 32), np.float32)).shape == (1, 13, 32,
                                                                                                           32, 32)
    with pytest.raises(EngineError, match="unknown precision"):
        create_engine(spec, "cpu", "int4")
