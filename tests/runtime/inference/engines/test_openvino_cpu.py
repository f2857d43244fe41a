"""OpenVINO on the CPU (``--engine openvino``): the same logits as ONNX Runtime's fp32 engine on a real CT, the
bundle's contract checked the same way, fp32 only, and flare-run / flare-bench with the engine chosen. OpenVINO never
loads in the pytest process (``openvino_support``: its thread pool is not fork-safe)."""

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
from flare.runtime.foundation.errors import InputError
from openvino_support import in_fresh_process


def test_openvino_matches_onnxruntime_fp32(tiny_bundle: Path) -> None:
    in_fresh_process("engines_match", tiny_bundle, data_path("ts_abdomen_ct_3mm.nii.gz"))


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
    in_fresh_process("contract", parity_bundle4)


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
    in_fresh_process("bench_side_by_side", tiny_bundle, data_path("ts_abdomen_ct_3mm.nii.gz"), tmp_path / "bench")


def test_openvino_never_loaded_in_the_test_process() -> None:
    import sys

    assert "openvino" not in sys.modules  # see openvino_support: later tests fork
