"""Scaling out: ``flare-run --server A,B --concurrency 4`` over 12 cases against TWO real flare-serve servers on
loopback gives the labels of local runs; a dead server fails only the cases sent to it (named per case); and the
instance placement of ``flare-serve --devices``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from serve_support import BIN, flare_servers, free_ports

REAL_CTS = ("ts_abdomen_ct_3mm.nii.gz", "ts_body_ct_3mm_int32.nii.gz", "ts_torso_ct_1p5mm_lps.nii.gz")


def _cases(tmp_path: Path, copies: int) -> Path:
    """A folder with ``copies`` links to each real CT (c0_NAME, c1_NAME, ...)."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for k in range(copies):
        for name in REAL_CTS:
            (cases / f"c{k}_{name}").symlink_to(data_path(name))
    return cases


def test_instances_spread_over_devices() -> None:
    from flare.runtime.foundation.errors import FlareError
    from flare.runtime.serving.server import instance_devices, parse_devices

    assert parse_devices("0,1") == [0, 1] and parse_devices(" 3 ") == [3]
    for bad in ("", "a", "0,0", "1,-1"):
        with pytest.raises(FlareError, match="--devices"):
            parse_devices(bad)
    assert instance_devices("auto", None, None) == ["auto"]
    assert instance_devices("cpu", None, 3) == ["cpu"] * 3
    assert instance_devices("auto", [0, 1], None) == ["cuda:0", "cuda:1"]
    assert instance_devices("gpu", [2, 5], 5) == ["cuda:2", "cuda:5", "cuda:2", "cuda:5", "cuda:2"]
    with pytest.raises(FlareError, match="contradicts"):
        instance_devices("cpu", [0], None)


def test_each_instance_gets_its_device(tiny_bundle: Path) -> None:
    """load_models hands each instance's Segmenter its own device string (cuda:N → Device.device_id, checked by
    the device tests); here with CPU Segmenters, the only kind this box can load."""
    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.serving.server import load_models

    seen: list[str] = []

    def segmenter(bundle, device, threads, gpu_mem_budget, engine):  # records, then loads a real CPU Segmenter
        from flare.runtime.pipeline.segmenter import Segmenter

        seen.append(device)
        return Segmenter(bundle, device="cpu", threads=threads, gpu_mem_budget=gpu_mem_budget, engine=engine)

    models = load_models(load_bundle(tiny_bundle), ["cuda:0", "cuda:1", "cuda:0"], None, segmenter)
    assert seen == ["cuda:0", "cuda:1", "cuda:0"] and len(models) == 3
    assert len({id(m.segmenter) for m in models}) == 3
    assert {m.segmenter.engines[0].backend for m in models} == {"onnxruntime"}


def test_instances_on_openvino(tiny_bundle: Path) -> None:
    """flare-serve --engine openvino: every instance on OpenVINO (in a fresh process: ``openvino_support``)."""
    from openvino_support import in_fresh_process

    in_fresh_process("serve_instances", tiny_bundle)


def test_device_index_reaches_the_engine_options() -> None:
    from flare.runtime.inference.engines.ort_cuda import cuda_provider_options

    assert cuda_provider_options("fp16", device_id=1)["device_id"] == "1"


@pytest.mark.slow
def test_two_servers_concurrency_4_equal_local(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    from flare.runtime.pipeline.segmenter import Segmenter

    cases = _cases(tmp_path, 4)
    local = Segmenter(tiny_bundle, device="cpu")
    expected = {name: local.segment(data_path(name)).labels for name in REAL_CTS}
    out = tmp_path / "out"
    with flare_servers(tiny_bundle, tmp_path, 2) as servers:
        proc = subprocess.run([str(BIN / "flare-run"), str(cases), "-o", str(out), "--server", ",".join(servers),
                               "--concurrency", "4", "--report", str(tmp_path / "reports"), "-q"],
                              capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 12 and summary["failed"] == 0
    for k in range(4):
        for name in REAL_CTS:
            stem = f"c{k}_{name}".removesuffix(".nii.gz")
            np.testing.assert_array_equal(np.asarray(nib.load(out / f"{stem}.nii.gz").dataobj), expected[name])
    # both servers answered (least busy first: with 4 in flight over 2 servers neither is left idle)
    answered = {json.loads(p.read_text())["server"] for p in (tmp_path / "reports").glob("*_report.json")}
    assert answered == set(servers)


@pytest.mark.slow
def test_a_dead_server_fails_only_its_cases(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    cases = _cases(tmp_path, 2)
    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    out, reports = tmp_path / "out", tmp_path / "reports"
    with flare_servers(tiny_bundle, tmp_path, 1) as servers:
        proc = subprocess.run([str(BIN / "flare-run"), str(cases), "-o", str(out), "--server",
                               f"{servers[0]},{dead}", "--concurrency", "2", "--report", str(reports), "-q"],
                              capture_output=True, text=True, timeout=900, check=False)
    summary = json.loads((out / "summary.json").read_text())
    failed = [c for c in summary["cases"] if c["status"] == "failed"]
    assert proc.returncode == (3 if failed else 0), proc.stderr
    assert summary["ok"] + len(failed) == 6 and summary["ok"] >= 1
    for c in failed:
        assert c["error"].startswith(f"{dead}: cannot reach the flare server"), c["error"]
    for c in summary["cases"]:
        if c["status"] == "ok":
            assert json.loads(Path(c["report"]).read_text())["server"] == servers[0]


@pytest.mark.slow
def test_server_mode_prints_the_synthetic_model_warning_once(synthetic_bundle: Path, tmp_path: Path) -> None:
    """Issue 19: the card is on the server; flare-run --server prints its one warning line once per run (not per
    case) and records it in summary.json, as a local run does."""
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    cases = _cases(tmp_path, 1)
    out = tmp_path / "out"
    with flare_servers(synthetic_bundle, tmp_path, 1) as servers:
        folder = subprocess.run([str(BIN / "flare-run"), str(cases), "-o", str(out), "--server", servers[0],
                                 "--concurrency", "2", "-q"], capture_output=True, text=True, timeout=900, check=False)
        single = subprocess.run([str(BIN / "flare-run"), str(data_path(REAL_CTS[0])), "-o", str(tmp_path / "s.nii.gz"),
                                 "--server", servers[0]], capture_output=True, text=True, timeout=900, check=False)
    for proc in (folder, single):
        assert proc.returncode == 0, proc.stderr
        warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("flare-run: warning: ")]
        assert len(warnings) == 1 and "synthetic data" in warnings[0], proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == len(REAL_CTS) and "synthetic data" in summary["model_warning"]
