"""The OpenVINO checks that load OpenVINO, run in a fresh interpreter each (:func:`in_fresh_process`).

OpenVINO's CPU plugin keeps a TBB thread pool, and TBB is not fork-safe: once OpenVINO has run in the pytest
process, a later test that forks (torch DataLoader workers) deadlocked or crashed the whole run with a segmentation
fault (measured on a clean clone, 2026-12-06). So no test loads OpenVINO in the pytest process; these functions run
in a child started by ``subprocess`` (fork + exec), with their asserts as the child's exit status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def in_fresh_process(name: str, *args: str | Path) -> None:
    """Run ``openvino_support.NAME(*args)`` in a new interpreter; a failed assert there fails the calling test."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import openvino_support as m; "
            f"m.{name}(*sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _tile(ct: str, spacing: float, side: int = 32) -> np.ndarray:
    from flare.export.quantize import case_tiles, case_volume

    return case_tiles(case_volume(Path(ct), [spacing] * 3, (-250.0, 250.0)), 1, side=side, max_tiles=1)[0]


def engines_match(bundle: str, ct: str) -> None:
    """OpenVINO's logits equal ONNX Runtime's fp32 (fold and locator), and again after the release."""
    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.inference.engines import create_engine

    b = load_bundle(bundle)
    tile = _tile(ct, b.spacing_mm[0])
    for spec in (b.folds[0], b.locator):
        ov, ort = create_engine(spec, "cpu", "fp32", engine="openvino"), create_engine(spec, "cpu", "fp32")
        assert (ov.backend, ov.precision, ort.backend) == ("openvino", "fp32", "onnxruntime")
        a, r = ov.run(tile), ort.run(tile)
        assert a.dtype == np.float32 and a.shape == r.shape == (1, spec.out_channels, *tile.shape[2:])
        assert float(np.abs(a - r).max()) < 1e-3 * max(1.0, float(np.abs(r).max()))
        assert np.array_equal(a, ov.run(tile))  # after the run's memory was released: the same result


def contract(bundle4: str) -> None:
    """The bundle's contract is checked on OpenVINO's compiled model as on an ONNX Runtime session."""
    import dataclasses

    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.foundation.errors import BundleError
    from flare.runtime.inference.engines import create_engine

    spec = load_bundle(bundle4).folds[0]
    assert create_engine(spec, "cpu", "fp32", engine="openvino").out_channels == 13  # divisor 8 passes the probe
    wrong = dataclasses.replace(spec, files={"fp32": dataclasses.replace(spec.files["fp32"], output_name="probs")})
    for bad, words in [(wrong, "has no output 'probs'"), (dataclasses.replace(spec, out_channels=14), "declares")]:
        try:
            create_engine(bad, "cpu", "fp32", engine="openvino")
        except BundleError as err:
            assert words in str(err), str(err)
        else:
            raise AssertionError(f"no BundleError for {words}")


def bench_side_by_side(bundle: str, ct: str, out: str) -> None:
    """flare-bench's engines side by side: named variants, both engines ran, labels agree."""
    from flare.benchmarks.harness import run_benchmark

    report = run_benchmark(bundle, [ct], reference=False, out_dir=out, repeats=1, cold=1, device="cpu", quiet=True,
                           engines=["onnxruntime", "openvino"])
    assert report["precisions"] == ["fp32", "fp32@openvino"] and report["engines"] == ["onnxruntime", "openvino"]
    by = report["cases"][0]["by_precision"]
    assert not report["cases"][0]["cold"]["errors"]
    assert by["fp32@openvino"]["warm"]["backend"]["engine"] == "openvino"
    assert by["fp32"]["warm"]["backend"]["engine"] == "onnxruntime"
    assert by["fp32@openvino"]["vs_fp32"]["voxel_agreement"] > 0.9999
    assert "fp32@openvino" in (Path(out) / "report.md").read_text()


def serve_instances(bundle: str) -> None:
    """flare-serve --engine openvino: every instance's Segmenter runs its folds on OpenVINO, on the CPU."""
    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.serving.server import load_models

    models = load_models(load_bundle(bundle), ["auto", "auto"], None, engine="openvino")
    assert [(m.segmenter.device, m.segmenter.engines[0].backend) for m in models] == [("cpu", "openvino")] * 2
