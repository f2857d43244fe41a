"""PyTorch network -> ONNX file with dynamic spatial axes, and the offline graph optimisation that is kept only when
it measurably helps.

The graph takes ``image`` ``(1, in_channels, X, Y, Z)`` and returns ``logits`` ``(1, out_channels, X, Y, Z)``;
X, Y, Z are dynamic and must be divisible by the network's spatial divisor
(:func:`flare.train.networks.spatial_divisor`: 16 for the 5-level SegResNetDS, 8 for the 4-level one), which the
bundle records per model.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flare.runtime.foundation.errors import FlareError

if TYPE_CHECKING:
    import torch

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: the optimised graph is kept only when it is at least 10 % faster (load + one tile): below that is timing noise
KEEP_RATIO = 0.9


def export_onnx(net: torch.nn.Module, path: Path, in_channels: int, opset: int = 17, divisor: int = 16) -> Path:
    """Trace ``net`` (eval, fp32) on a small dummy tile (sides twice its spatial ``divisor``) and write an ONNX file
    with dynamic X, Y, Z."""
    import onnx
    import torch

    dummy = torch.zeros(1, in_channels, *(2 * divisor,) * 3)
    axes = {2: "x", 3: "y", 4: "z"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and training-mode notices
        torch.onnx.export(net.eval(), (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path))
    return path


def ort_session(path: Path, optimise: bool = True, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (what verification and the latency measurement use)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 (ORT raises several unrelated types)
        raise FlareError(path, f"ONNX Runtime cannot load the model ({str(exc).splitlines()[0][:300]})") from None


@dataclass
class Latency:
    load_s: float
    run_s: float  # best of the timed runs

    def as_dict(self) -> dict[str, float]:
        return {"load_s": round(self.load_s, 4), "run_s": round(self.run_s, 4)}


def measure_latency(path: Path, in_channels: int, side: int = 64, repeats: int = 3) -> Latency:
    """Session creation time and the best of ``repeats`` runs on one ``side``³ tile (ORT CPU, default options)."""
    t0 = time.perf_counter()
    sess = ort_session(path)
    load = time.perf_counter() - t0
    x = np.random.default_rng(0).random((1, in_channels, side, side, side), dtype=np.float32)
    sess.run(None, {INPUT_NAME: x})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        best = min(best, time.perf_counter() - t0)
    return Latency(load, best)


def optimise_offline(src: Path, dst: Path) -> Path:
    """ORT offline optimisation at ``ORT_ENABLE_BASIC`` (constant folding, Identity/redundant-node removal,
    Conv+Add/Mul fusions): the result is plain ONNX, portable to every execution provider and to TensorRT."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    onnx.checker.check_model(str(dst))
    return dst


def optimise_if_helpful(path: Path, in_channels: int, side: int = 32) -> dict[str, Any]:
    """Optimise ``path`` offline and keep the result (replacing ``path``) only if one session load plus one tile
    run gets at least 10 % faster on ORT CPU; returns what was measured. ORT applies the same passes at load time anyway, so the
    gain is mostly in load time and file size; a slower or equal result is discarded."""
    candidate = path.with_name(path.stem + ".opt.onnx")
    try:
        optimise_offline(path, candidate)
        before = measure_latency(path, in_channels, side)
        after = measure_latency(candidate, in_channels, side)
        kept = after.load_s + after.run_s < KEEP_RATIO * (before.load_s + before.run_s)
        report = {"method": "onnxruntime offline ORT_ENABLE_BASIC", "tile": [side] * 3, "kept": kept,
                  "before": before.as_dict(), "after": after.as_dict(),
                  "bytes_before": path.stat().st_size, "bytes_after": candidate.stat().st_size}
        if kept:
            candidate.replace(path)
        return report
    finally:
        candidate.unlink(missing_ok=True)
