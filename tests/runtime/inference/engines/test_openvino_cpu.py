"""OpenVINO on the CPU (``--engine openvino``): the same logits as ONNX Runtime's fp32 engine on a real CT, the
bundle's contract checked the same way, fp32 only, and flare-run / flare-bench with the engine chosen."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import assert_clean_failure, flare_run
from conftest import data_path
from flare.runtime.bundle.manifest import load_bundle
from flare.runtime.foundation.errors import BundleError, InputError


def _tile(spacing: float, side: int = 32) -> np.ndarray:
    from flare.export.quantize import case_tiles, case_volume

    vol = case_volume(data_path("ts_abdomen_ct_3mm.nii.gz"), [spacing] * 3, (-250.0, 250.0))
    return case_tiles(vol, 1, side=side, max_tiles=1)[0]


def test_openvino_matches_onnxruntime_fp32(tiny_bundle: Path) -> None:
    from flare.runtime.inference.engines import create_engine

    b = load_bundle(tiny_bundle)
    tile = _tile(b.spacing_mm[0])
    for spec in (b.folds[0], b.locator):
        ov, ort = create_engine(spec, "cpu", "fp32", engine="openvino"), create_engine(spec, "cpu", "fp32")
        assert (ov.backend, ov.precision, ort.backend) == ("openvino", "fp32", "onnxruntime")
        a, r = ov.run(tile), ort.run(tile)
        assert a.dtype == np.float32 and a.shape == r.shape == (1, spec.out_channels, *tile.shape[2:])
        assert float(np.abs(a - r).max()) < 1e-3 * max(1.0, float(np.abs(r).max()))
        again = ov.run(tile)  # after the run's memory was released: the same result
        assert np.array_equal(a, again)


def test_openvino_runs_fp32_only(tiny_bundle: Path) -> None:
    from flare.runtime.inference.engines import EngineError, create_engine, default_precision

    spec = load_bundle(tiny_bundle).folds[0]
    assert default_precision(dataclasses.replace(spec, files={**spec.files, "int8": spec.files["fp32"]}), "cpu",
                             "openvino") == "fp32"
    with pytest.raises(EngineError, match="runs the fp32 models only"):
        create_engine(spec, "cpu", "int8", engine="openvino")
    with pytest.raises(EngineError, match="unknown engine"):
        create_engine(spec, "cpu", "fp32", engine="tensorflow")


def test_openvino_checks_the_contract(parity_bundle4: Path) -> None:
    from flare.runtime.inference.engines import create_engine

    spec = load_bundle(parity_bundle4).folds[0]
    assert create_engine(spec, "cpu", "fp32", engine="openvino").out_channels == 13  # divisor 8 passes the probe
    wrong = dataclasses.replace(spec, files={"fp32": dataclasses.replace(spec.files["fp32"], output_name="probs")})
    with pytest.raises(BundleError, match="has no output 'probs'"):
        create_engine(wrong, "cpu", "fp32", engine="openvino")
    with pytest.raises(BundleError, match="13 channels|declares"):
        create_engine(dataclasses.replace(spec, out_channels=14), "cpu", "fp32", engine="openvino")


def test_flare_run_with_openvino(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    seg = {}
    for engine in ("onnxruntime", "openvino"):
        out, rep = tmp_path / f"{engine}.nii.gz", tmp_path / f"{engine}.json"
        proc = flare_run(ct, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "--precision", "fp32",
                         "--engine", engine, "--report", rep)
        assert proc.returncode == 0, proc.stderr
        assert f"(fp32, {engine})" in proc.stderr
        assert json.loads(rep.read_text())["backend"]["engine"] == engine
        seg[engine] = np.asarray(nib.load(out).dataobj)
    assert seg["openvino"].shape == nib.load(ct).shape
    assert (seg["openvino"] == seg["onnxruntime"]).mean() > 0.9999  # fp32 both: ties at most


def test_openvino_refuses_other_precisions_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    proc = flare_run(data_path("ts_abdomen_ct_3mm.nii.gz"), "-o", out, "--bundle", tiny_bundle, "--engine",
                     "openvino", "--precision", "fp16")
    assert_clean_failure(proc, "openvino", "fp32 models only", "--precision fp32")
    assert not out.exists()


def test_bench_variants() -> None:
    from flare.benchmarks.harness import variant, variant_keys

    assert variant_keys([], []) == [None]
    assert variant_keys(["fp32", "int8"], []) == ["fp32", "int8"]
    assert variant_keys([], ["onnxruntime", "openvino"], "int8") == ["int8", "fp32@openvino"]
    assert variant_keys([], ["openvino"], "int8") == ["fp32@openvino"]
    assert variant_keys(["fp32", "int8"], ["onnxruntime", "openvino"]) == ["fp32", "int8", "fp32@openvino"]
    with pytest.raises(InputError, match="runs fp32 only"):
        variant_keys(["int8"], ["openvino"])
    assert [variant(k) for k in (None, "int8", "fp32@openvino")] == [(None, "onnxruntime"), ("int8", "onnxruntime"),
                                                                      ("fp32", "openvino")]


def test_bench_runs_the_engines_side_by_side(tiny_bundle: Path, tmp_path: Path) -> None:
    from flare.benchmarks.harness import run_benchmark

    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    report = run_benchmark(tiny_bundle, [ct], reference=False, out_dir=tmp_path / "bench", repeats=1, cold=1,
                           device="cpu", quiet=True, engines=["onnxruntime", "openvino"])
    assert report["precisions"] == ["fp32", "fp32@openvino"] and report["engines"] == ["onnxruntime", "openvino"]
    by = report["cases"][0]["by_precision"]
    assert not report["cases"][0]["cold"]["errors"]
    assert by["fp32@openvino"]["warm"]["backend"]["engine"] == "openvino"
    assert by["fp32"]["warm"]["backend"]["engine"] == "onnxruntime"
    assert by["fp32@openvino"]["vs_fp32"]["voxel_agreement"] > 0.9999
    assert "fp32@openvino" in (tmp_path / "bench" / "report.md").read_text()
