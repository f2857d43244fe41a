"""The Python steps of ``benchmarks/gpu_check.sh``: each prints one JSON line per result on stdout as soon as it
has it (the script appends them to ``$OUT/results.jsonl``), logs to stderr, and exits non-zero when it failed.

``python -m flare.benchmarks.gpu_check STEP --device cuda|cpu ...``:

- ``setup``: imports torch first (it loads the CUDA/cuDNN libraries onnxruntime-gpu uses), then every module of
  ``flare.runtime`` and every package the runtime needs there; on CUDA the CUDA provider must be listed;
- ``smoke`` (~seconds): one small fp16 graph (Conv, BatchNormalization, Relu, Conv; converted by flare's own fp16
  pass) in one session with flare's CUDA provider options, NVML before and after creating the session, one 96³
  tile, finite output, fp16 vs fp32 difference;
- ``bundle``: loads the bundle once (schema, hashes) and reports its models;
- ``budget``: a Segmenter at ``--budget`` MB, ``--runs`` runs (the first is cold for the tile shape), one line per run
  with the memory plan's design (``resident`` / ``grouped``, estimated or measured, and why);
- ``sweep``: one fold's session at one tile side, precision, ``prefer_nhwc`` and cuDNN algorithm search (one
  process per point: ONNX Runtime's arena only grows): NVML used memory, first and steady ms per tile.

On ``--device cpu`` (the dry run) the same code runs with ONNX Runtime's CPU provider and numpy; NVML figures are
``null``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: import name -> distribution (the version is read from the distribution's metadata)
RUNTIME_NEEDS = {"numpy": "numpy", "scipy": "scipy", "nibabel": "nibabel", "cc3d": "connected-components-3d",
                 "jsonschema": "jsonschema", "typer": "typer", "rich": "rich", "onnxruntime": None}
CUDA_NEEDS = {"cupy": "cupy-cuda13x", "pynvml": "nvidia-ml-py"}


def emit(**record: Any) -> None:
    print(json.dumps(record, default=str), flush=True)


def _import_torch_first() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def setup(device: str) -> int:
    torch = _import_torch_first()
    failed: dict[str, str] = {}
    versions: dict[str, str] = {}
    from importlib import metadata

    for name, dist in {**RUNTIME_NEEDS, **(CUDA_NEEDS if device == "cuda" else {})}.items():
        try:
            module = importlib.import_module(name)
            versions[name] = metadata.version(dist) if dist else str(module.__version__)
        except Exception as exc:  # noqa: BLE001 - report every missing package, not the first
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    import flare.runtime

    modules = 0
    for info in pkgutil.walk_packages(flare.runtime.__path__, "flare.runtime."):
        try:
            importlib.import_module(info.name)
            modules += 1
        except Exception as exc:  # noqa: BLE001
            failed[info.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    providers: list[str] = []
    if "onnxruntime" not in failed:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        versions["onnxruntime_file"] = ort.__file__
        if device == "cuda" and "CUDAExecutionProvider" not in providers:
            failed["CUDAExecutionProvider"] = f"not among {providers} (onnxruntime-gpu did not load)"
    emit(stage="setup", ok=not failed, device=device, torch=torch, versions=versions, providers=providers,
         runtime_modules=modules, failed=failed)
    return 1 if failed else 0


def _smoke_model(folder: Path) -> tuple[Path, Path]:
    """A small fp32 graph Conv → BatchNormalization → Relu → Conv (13 outputs) and its fp16 conversion."""
    import onnx
    from flare.export.fp16 import convert_to_fp16
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 16
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (c, 1, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(1, 0.1, c).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "bias"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "var"),
             numpy_helper.from_array(rng.normal(0, 0.2, (13, c, 1, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1] * 6),
             helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["logits"])]
    dims: list[str | int | None] = [1, 1, "x", "y", "z"]
    graph = helper.make_graph(nodes, "smoke", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 13, "x", "y", "z"])],
                              inits)
    # IR 8 (what opset 17 needs): onnx 1.23 writes IR 14 by default, which the image's onnxruntime 1.30 refuses
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    fp32 = folder / "smoke.fp32.onnx"
    onnx.save(model, str(fp32))
    return fp32, convert_to_fp16(fp32, folder / "smoke.fp16.onnx")


def smoke(device: str, side: int = 96) -> int:
    import tempfile

    _import_torch_first()
    import onnxruntime as ort
    from flare.runtime.inference.device import device_memory_used_mb
    from flare.runtime.inference.engines.ort_cuda import cuda_provider_options

    with tempfile.TemporaryDirectory() as tmp:
        fp32, fp16 = _smoke_model(Path(tmp))
        providers: list[Any] = (["CPUExecutionProvider"] if device == "cpu" else
                                [("CUDAExecutionProvider", cuda_provider_options("fp16")), "CPUExecutionProvider"])
        x = np.random.default_rng(1).random((1, 1, side, side, side), dtype=np.float32)
        before = device_memory_used_mb()
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(fp16), providers=providers)
        session_s = time.perf_counter() - t0
        after_session = device_memory_used_mb()
        active = sess.get_providers()
        t0 = time.perf_counter()
        out = sess.run(None, {"image": x})[0]
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = sess.run(None, {"image": x})[0]
        tile_s = time.perf_counter() - t0
        after_tile = device_memory_used_mb()
        ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    finite = bool(np.isfinite(out).all())
    on_device = device == "cpu" or (bool(active) and active[0] == "CUDAExecutionProvider")
    emit(stage="smoke", ok=finite and on_device, device=device, active_providers=active, tile=[side] * 3,
         nvml_used_mb={"before": before, "after_session": after_session, "after_tile": after_tile},
         session_s=round(session_s, 4), first_tile_s=round(first_s, 4), tile_s=round(tile_s, 4), finite=finite,
         max_abs_diff_vs_fp32=float(np.abs(out.astype(np.float32) - ref).max()),
         argmax_agreement=float((out.argmax(1) == ref.argmax(1)).mean()))
    return 0 if finite and on_device else 1


def bundle(path: Path) -> int:
    _import_torch_first()
    from flare.runtime.bundle.manifest import load_bundle

    t0 = time.perf_counter()
    b = load_bundle(path)
    emit(stage="bundle-load", ok=True, bundle=str(b.root), load_s=round(time.perf_counter() - t0, 3),
         folds=len(b.folds), locator=b.locator is not None, roi=list(b.roi),
         files={m.name: sorted(m.files) for m in ([b.locator] if b.locator else []) + list(b.folds)})
    return 0


def budget(path: Path, case: Path, budget_mb: float, device: str, runs: int) -> int:
    _import_torch_first()
    from flare.runtime.image.nifti import read_image
    from flare.runtime.pipeline.segmenter import Segmenter

    seg = Segmenter(path, device=device, gpu_mem_budget=budget_mb)
    img = read_image(case)
    for i in range(runs):  # run 0 is cold for the tile shape (cuDNN plans)
        t0 = time.perf_counter()
        r = seg.segment(img).report.to_json()
        emit(stage="budget", budget_mb=budget_mb, run=i, wall_s=round(time.perf_counter() - t0, 4),
             design=r["backend"].get("design"),  # which design ran (resident / grouped) and why
             total_s=r["total_s"], stages=r["stages"], gpu_peak_mb=r.get("gpu_peak_mb"), gpu=r.get("gpu"),
             tiles=r["tiles"], crop=r["crop"], fallbacks=r.get("fallbacks"),
             load=r["backend"]["load"] if i == 0 else None)
    return 0


def sweep(path: Path, precision: str, side: int, device: str, nhwc: str | None, algo: str) -> int:
    _import_torch_first()
    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.inference.device import device_memory_used_mb

    spec = load_bundle(path).folds[0]
    before = device_memory_used_mb()
    extra = {} if nhwc is None else {"prefer_nhwc": nhwc}
    if device == "cuda":
        import cupy
        from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

        eng: Any = CudaOrtEngine(spec, precision, extra, algo_search=algo)
        x: Any = cupy.random.random((1, 1, side, side, side), dtype=cupy.float32)
        run, sync = eng.run_cupy, cupy.cuda.Device().synchronize
    else:
        from flare.runtime.inference.engines import create_engine

        eng = create_engine(spec, "cpu", precision)
        x = np.random.default_rng(0).random((1, 1, side, side, side), dtype=np.float32)
        run, sync = eng.run, (lambda: None)
    t0 = time.perf_counter()
    run(x)
    sync()
    first = time.perf_counter() - t0
    n = 3
    t0 = time.perf_counter()
    for _ in range(n):
        run(x)
    sync()
    emit(stage="sweep", device=device, precision=precision, side=side, prefer_nhwc=nhwc, algo_search=algo,
         used_before_mb=before, used_mb=device_memory_used_mb(), first_ms=round(first * 1e3, 1),
         ms=round((time.perf_counter() - t0) / n * 1e3, 2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flare.benchmarks.gpu_check")
    p.add_argument("step", choices=["setup", "smoke", "bundle", "budget", "sweep"])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--bundle", type=Path)
    p.add_argument("--case", type=Path)
    p.add_argument("--budget", type=float, default=4000.0)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--side", type=int, default=96)
    p.add_argument("--nhwc", choices=["0", "1"], default=None, help="prefer_nhwc (default: the engine's choice)")
    p.add_argument("--algo", default="HEURISTIC", help="cudnn_conv_algo_search")
    a = p.parse_args(argv)
    try:
        if a.step == "setup":
            return setup(a.device)
        if a.step == "smoke":
            return smoke(a.device, a.side)
        if a.step == "bundle":
            return bundle(a.bundle)
        if a.step == "budget":
            return budget(a.bundle, a.case, a.budget, a.device, a.runs)
        return sweep(a.bundle, a.precision, a.side, a.device, a.nhwc, a.algo)
    except Exception as exc:  # noqa: BLE001 - one JSON line saying what failed, and a non-zero exit
        emit(stage=a.step, ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
        import traceback

        traceback.print_exc(file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
