"""flare-export: ONNX export (fp32/fp16) with parity checks, bundle.json contents, atomic output, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_FOLD_NET, _tiny_config
from flare.runtime.bundle.manifest import load_bundle, sha256_file
from flare.runtime.foundation.errors import BundleError, FlareError, InputError, OutputError


@pytest.fixture(scope="module")
def exported(tiny_checkpoints: Path, tmp_path_factory) -> Path:
    """fp32 + fp16 bundle of the tiny checkpoints, verified (random tiles + the real CT when present)."""
    from flare.export import export_bundle

    out = tmp_path_factory.mktemp("export") / "bundle"
    assert export_bundle(tiny_checkpoints, out, fp16=True, progress=False) == out
    return out


def test_bundle_loads_with_both_precisions(exported: Path, tiny_checkpoints: Path) -> None:
    b = load_bundle(exported)
    assert b.precisions == ("fp32", "fp16") and len(b.folds) == 2 and b.locator is not None
    assert b.spacing_mm == (3.0, 3.0, 3.0) and b.hu_window == (-250.0, 250.0)
    assert b.locator_spacing_mm == (6.0, 6.0, 6.0) and b.locator_margin_mm == 20.0
    assert b.roi == (64, 64, 64) and b.locator_roi == (32, 32, 32)
    assert b.folds[0].out_channels == 13 and b.locator.out_channels == 1
    # each network's own divisor: the 4-level SegResNet locator 8, the 5-level SegResNetDS folds 16
    assert b.locator.spatial_divisor == 8 and [m.spatial_divisor for m in b.folds] == [16, 16] and b.fold_divisor == 16
    for m in (b.locator, *b.folds):
        for f in m.files.values():
            assert (f.input_name, f.output_name, f.input_dtype, f.output_dtype) == ("image", "logits", "float32",
                                                                                    "float32")
    prov = b.provenance
    assert prov["checkpoint_dir"] == str(tiny_checkpoints.resolve()) and prov["opset"] == 17
    for name in ("locator", "fold0", "fold1"):
        ck = prov["checkpoints"][name]
        assert sha256_file(tiny_checkpoints / ck["path"]) == ck["sha256"]
    assert all(prov[k] for k in ("torch", "monai", "onnx", "onnxruntime", "exported_at", "config_sha256"))
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_verification_report(exported: Path, shared_data: Path) -> None:
    report = json.loads((exported / "bundle.json").read_text())["verification"]
    assert report["passed"] and report["ct"] and Path(report["ct"]).is_file()
    for name, per_precision in report["models"].items():
        assert set(per_precision) == {"fp32", "fp16"}
        for precision, r in per_precision.items():
            tiles = [c["tile"] for c in r["checks"]]
            assert any(t.startswith("CT ") for t in tiles) and len(tiles) == 3
            for c in r["checks"]:
                assert c["finite"] and c["agreement"] >= 0.999
                assert c["rel_err"] <= (1e-4 if precision == "fp32" else 1e-2), (name, precision, c)


def test_parity_on_fresh_tile(exported: Path, tiny_checkpoints: Path) -> None:
    """Independently of the export's own check: ORT CPU fp32/fp16 vs PyTorch on a new non-cubic tile."""
    import onnxruntime as ort
    import torch
    from flare.train.checkpoints import load_network

    x = np.random.default_rng(7).random((1, 1, 16, 48, 32), dtype=np.float32)
    net, _ = load_network(tiny_checkpoints / "fold1")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    for precision, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        sess = ort.InferenceSession(str(exported / f"fold1.{precision}.onnx"), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"image": x})[0]
        assert out.dtype == np.float32 and np.isfinite(out).all()
        assert np.abs(out - ref).max() / np.abs(ref).max() < tol


def test_fp16_file_is_fp16_with_fp16_batch_norms(exported: Path) -> None:
    import onnx
    from onnx import TensorProto

    m = onnx.shape_inference.infer_shapes(onnx.load(str(exported / "fold0.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in (*m.graph.value_info, *m.graph.input, *m.graph.output)}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    convs = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    norms = [n for n in m.graph.node if n.op_type.endswith("Normalization")]
    assert convs and norms
    assert all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)  # fp16 weights
    # BatchNormalization runs in fp16 (issue 16); normalisations over a whole tile (instance/group/layer) stay fp32
    assert all(types[i] == TensorProto.FLOAT16 for n in norms if n.op_type == "BatchNormalization" for i in n.input if i)
    assert all(types[i] == TensorProto.FLOAT for n in norms if n.op_type != "BatchNormalization" for i in n.input if i)
    assert (exported / "fold0.fp16.onnx").stat().st_size < 0.6 * (exported / "fold0.fp32.onnx").stat().st_size


def test_tampered_fp16_model_refused(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    with open(copy / "fold0.fp16.onnx", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(copy)


def test_overwrite_rules(exported: Path, tiny_checkpoints: Path, tmp_path: Path) -> None:
    from flare.export import export_bundle

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a flare bundle"):
        export_bundle(tiny_checkpoints, foreign, verify=False, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # an existing bundle is replaced as a whole (here by an fp32-only export)
    bundle = tmp_path / "bundle"
    shutil.copytree(exported, bundle)
    export_bundle(tiny_checkpoints, bundle, verify=False, progress=False)
    assert load_bundle(bundle).precisions == ("fp32",) and not (bundle / "fold0.fp16.onnx").exists()
    assert json.loads((bundle / "bundle.json").read_text())["verification"] == {"skipped": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "foreign"]
    # a bundle that holds the checkpoints being exported would delete them when replaced
    shutil.copytree(tiny_checkpoints, bundle / "ckpt")
    with pytest.raises(OutputError, match="which this export reads"):
        export_bundle(bundle / "ckpt", bundle, verify=False, progress=False)
    assert (bundle / "ckpt" / "fold0" / "model.pt").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_leaves_no_staging_folder(exported: Path, tiny_checkpoints: Path, tmp_path: Path, sig: int) -> None:
    """flare-export stopped while its staging folder holds a model: exit 128 + signal, one line, the old bundle
    untouched, nothing else beside it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported, bundle)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    marker = tmp_path / "marker"
    env = {**os.environ, "FLARE_TEST_PAUSE_AT": "export:fold0", "FLARE_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", "from flare.export.cli import main; main()",
                             str(tiny_checkpoints), "-o", str(bundle), "--no-verify", "-q"], env=env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 (one signal)
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err, (proc.returncode, err)
    said = "interrupted" if sig == signal.SIGINT else f"terminated by {signal.Signals(sig).name}"
    assert err.strip().splitlines() == [f"flare-export: {said}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "marker"]
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


def test_bad_checkpoints_leave_nothing(tiny_checkpoints: Path, tmp_path: Path) -> None:
    import torch
    from flare.export import export_bundle
    from flare.train.checkpoints import save_checkpoint
    from flare.train.networks import build_network

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    cfg = _tiny_config("fold", 1, TINY_FOLD_NET)
    save_checkpoint(ckpt / "fold1", build_network(TINY_FOLD_NET), {**cfg, "spacing_mm": [1.5, 1.5, 1.5]})
    out = tmp_path / "out"
    with pytest.raises(InputError, match="folds disagree on spacing_mm") as err:
        export_bundle(ckpt, out, progress=False)
    assert "\n" not in str(err.value)
    torch.save({"not": "a checkpoint"}, ckpt / "fold1" / "model.pt")
    with pytest.raises(InputError, match="not a flare checkpoint"):
        export_bundle(ckpt, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_non_finite_output_fails_export(tmp_path: Path) -> None:
    import torch
    from flare.export.bundle_export import export_sources
    from flare.export.sources import ExportSources, ModelSource

    net = torch.nn.Conv3d(1, 13, 1).eval()
    with torch.no_grad():
        net.weight.fill_(float("inf"))
        net.weight[0] = -float("inf")  # inf - inf = NaN downstream of any sum
    src = ModelSource("fold0", "fold", net, 1, 13, tmp_path / "x.pt", {"network": TINY_FOLD_NET}, "0")
    sources = ExportSources(root=tmp_path, kind="flare", folds=[src], locator=None, spacing_mm=(1.0, 1.0, 1.0),
                            hu_window=(-250.0, 250.0), roi=(32, 32, 32))
    (tmp_path / "x.pt").write_bytes(b"x")
    with pytest.raises(FlareError, match="NaN/inf"):
        export_sources(sources, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"spacing_mm": (0.0, 1.0, 1.0)}, {"hu_window": (250.0, -250.0)}])
def test_a_bundle_flare_run_would_refuse_is_not_written(tmp_path: Path, change: dict) -> None:
    import torch
    from flare.export.bundle_export import export_sources
    from flare.export.sources import ExportSources, ModelSource

    src = ModelSource("fold0", "fold", torch.nn.Conv3d(1, 13, 1).eval(), 1, 13, tmp_path / "x.pt",
                      {"network": TINY_FOLD_NET}, "0")
    (tmp_path / "x.pt").write_bytes(b"x")
    base = {"spacing_mm": (1.0, 1.0, 1.0), "hu_window": (-250.0, 250.0)}
    sources = ExportSources(root=tmp_path, kind="flare", folds=[src], locator=None, roi=(32, 32, 32),
                            **{**base, **change})
    with pytest.raises(InputError, match="a bundle that flare-run would refuse") as err:
        export_sources(sources, tmp_path / "out", progress=False, verify=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flare.export.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = _cli(str(tmp_path / "missing"), "-o", str(tmp_path / "b"))
    assert r.returncode == 2 and "checkpoint folder does not exist" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("-o", str(tmp_path / "b"))
    assert r.returncode == 2 and "exactly one" in r.stderr
    assert not (tmp_path / "b").exists()


def test_cli_exports(tiny_checkpoints: Path, tmp_path: Path) -> None:
    r = _cli(str(tiny_checkpoints), "-o", str(tmp_path / "b"), "--no-verify", "-q", "--opset", "18")
    assert r.returncode == 0, r.stderr
    b = load_bundle(tmp_path / "b")
    assert b.folds[0].opset == 18 and b.provenance["command"].startswith("flare-export ")


def test_trt_absent_gives_clear_message(tiny_checkpoints: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed")
    from flare.export import export_bundle

    with pytest.raises(FlareError, match="TensorRT is not installed"):
        export_bundle(tiny_checkpoints, tmp_path / "b", trt=True, progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
@pytest.mark.trt
def test_trt_engine_build_and_cache(exported: Path, tmp_path: Path) -> None:
    """UNVERIFIED path: runs only where TensorRT and a CUDA GPU exist."""
    pytest.importorskip("tensorrt")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from flare.export.trt import build_bundle_engines

    bundle = tmp_path / "b"
    shutil.copytree(exported, bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    first = build_bundle_engines(bundle, doc)
    plan = bundle / first[0]["path"]
    mtime = plan.stat().st_mtime_ns
    assert build_bundle_engines(bundle, doc)[0]["path"] == first[0]["path"] and plan.stat().st_mtime_ns == mtime
    plan.write_bytes(plan.read_bytes()[:-1])  # corrupt: must be rebuilt, never loaded
    build_bundle_engines(bundle, doc)
    assert plan.stat().st_mtime_ns != mtime


def test_model_card_from_training_or_derived_and_card_option(tiny_checkpoints: Path, tmp_path: Path) -> None:
    from flare.export.bundle_export import model_card
    from flare.export.sources import flare_sources

    derived = model_card(flare_sources(tiny_checkpoints))
    assert derived.dataset == "unknown" and derived.data == "unknown" and derived.trained_at != "unknown"
    # flare-train's card.json in the checkpoint folder is taken as it is
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    (ckpt / "card.json").write_text(json.dumps({"dataset": "flare-phantoms", "cases": 30, "data": "synthetic",
                                                "recipe": "tiny", "trained_at": "2026-12-01",
                                                "validation_dice": {"liver": 0.8}}))
    assert model_card(flare_sources(ckpt)).synthetic
    # --card replaces fields; the bundle carries the result
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"dataset": "FLARE23", "data": "real", "licence": "Apache-2.0"}))
    r = _cli(str(ckpt), "-o", str(tmp_path / "b"), "--no-verify", "-q", "--card", str(card))
    assert r.returncode == 0, r.stderr
    b = load_bundle(tmp_path / "b")
    assert (b.card.dataset, b.card.data, b.card.cases, b.card.licence) == ("FLARE23", "real", 30, "Apache-2.0")
    assert b.card.validation_dice == {"liver": 0.8} and b.card.warning() is None
    # a bad card file is one line, exit 2, before any export work
    card.write_text(json.dumps({"data": "phantom"}))
    r = _cli(str(ckpt), "-o", str(tmp_path / "c"), "--no-verify", "-q", "--card", str(card))
    assert r.returncode == 2 and "not a valid model card" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_four_level_folds_declare_divisor_8(tiny4_checkpoints: Path, tmp_path: Path) -> None:
    """The cpu recipe's depth: 4-level folds get spatial_divisor 8, their ROI may be a multiple of 8 only, and the
    verification's non-cubic random tile is 8x16x24 (run through ONNX Runtime against PyTorch)."""
    from flare.export.bundle_export import export_sources
    from flare.export.sources import flare_sources

    src = flare_sources(tiny4_checkpoints)
    src.roi = (56, 56, 56)
    out = export_sources(src, tmp_path / "b", progress=False)
    b = load_bundle(out)
    assert [m.spatial_divisor for m in b.folds] == [8, 8] and b.fold_divisor == 8 and b.roi == (56, 56, 56)
    checked = [c["tile"] for c in b.raw["verification"]["models"]["fold0"]["fp32"]["checks"]]
    assert "random 8x16x24" in checked, checked
