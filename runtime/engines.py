"""Inference engines: one tile in, class scores out.

An :class:`Engine` takes a float32 array ``(1, C_in, X, Y, Z)`` whose spatial sides are divisible by the model's
``spatial_divisor`` and returns float32 logits ``(1, C_out, X, Y, Z)``. Every output is checked for NaN/inf (fp16
paths have produced NaN on some providers): a non-finite output raises :class:`EngineError` instead of silently
producing a wrong segmentation.

``create_engine`` builds the ONNX Runtime engine for a bundle model on ``cpu`` or ``cuda``; the CUDA and TensorRT
engines of :mod:`flare.runtime.gpu` plug into the same interface.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .bundle import ModelSpec
from .bundle_contract import check_model_contract
from .errors import FlareError

log = logging.getLogger("flare.runtime")

__all__ = ["Engine", "EngineError", "OrtEngine", "create_engine", "ort_providers", "resolve_device"]


class EngineError(FlareError):
    """An engine could not be created or produced an unusable output."""


@runtime_checkable
class Engine(Protocol):
    name: str
    backend: str
    precision: str
    out_channels: int

    def run(self, tile: np.ndarray) -> np.ndarray: ...


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineError(None, "onnxruntime is not installed: pip install 'flare-seg[cpu]' "
                                "(or 'flare-seg[gpu]' for onnxruntime-gpu; never both)") from None
    return ort


def ort_providers() -> list[str]:
    """Execution providers of the installed ONNX Runtime (empty when it is not installed)."""
    try:
        return list(_import_ort().get_available_providers())
    except EngineError:
        return []


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when ONNX Runtime has a usable CUDA provider, else ``cpu``; validates the name."""
    if device not in ("auto", "cpu", "cuda"):
        raise EngineError(None, f"unknown device {device!r} (use auto, cpu or cuda)")
    has_cuda = "CUDAExecutionProvider" in ort_providers()
    if device == "cuda" and not has_cuda:
        raise EngineError(None, "device cuda asked for, but ONNX Runtime has no CUDA provider "
                                "(install onnxruntime-gpu: pip install 'flare-seg[gpu]')")
    if device == "auto":
        picked = "cuda" if has_cuda else "cpu"
        log.info("device auto -> %s (%s)", picked,
                 "ONNX Runtime CUDA provider found" if has_cuda else "no ONNX Runtime CUDA provider")
        return picked
    return device


def _session_options(threads: int | None) -> Any:
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


class OrtEngine:
    """ONNX Runtime session for one bundle model (CPU or CUDA provider)."""

    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, provider_options: dict[str, Any] | None = None) -> None:
        ort = _import_ort()
        mf = spec.file_for(precision)
        self.spec = spec
        self.name = spec.name
        self.out_channels = spec.out_channels
        self.precision = "fp16" if mf.input_dtype == "float16" else "fp32"
        self.device = device
        self._input_name, self._output_name = mf.input_name, mf.output_name
        self._in_dtype = np.float16 if mf.input_dtype == "float16" else np.float32
        if device == "cuda":
            providers: list[Any] = [("CUDAExecutionProvider", provider_options or {}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        env_threads = int(os.environ.get("FLARE_THREADS", "0")) or None
        try:
            self.session = ort.InferenceSession(str(mf.path), sess_options=_session_options(threads or env_threads),
                                                providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(mf.path, f"ONNX Runtime cannot load this model: {str(exc).splitlines()[0]}") from None
        check_model_contract(mf, spec, self.session)  # declared names/types/channels/divisor vs the real model

    def run(self, tile: np.ndarray) -> np.ndarray:
        feed = {self._input_name: np.ascontiguousarray(tile, dtype=self._in_dtype)}
        out = self.session.run([self._output_name], feed)[0]
        out = np.asarray(out, dtype=np.float32)
        if not np.isfinite(out).all():
            raise EngineError(self.spec.file_for(self.precision).path,
                              f"model {self.name} ({self.precision}) produced NaN/inf; "
                              "use the fp32 model (--precision fp32) or another device")
        return out


def create_engine(spec: ModelSpec, device: str = "cpu", precision: str | None = None,
                  threads: int | None = None) -> Engine:
    """Engine for ``spec`` on a resolved device (``cpu`` or ``cuda``). Default precision: fp16 on CUDA when the
    bundle has it, fp32 on CPU (ONNX Runtime's CPU kernels are fp32)."""
    if precision is None:
        precision = "fp16" if device == "cuda" and "fp16" in spec.files else "fp32"
    if precision not in ("fp32", "fp16"):
        raise EngineError(None, f"unknown precision {precision!r} (use fp32 or fp16)")
    if device == "cuda":
        from .cuda_engine import CudaOrtEngine

        return CudaOrtEngine(spec, precision=precision, threads=threads)
    return OrtEngine(spec, device=device, precision=precision, threads=threads)
