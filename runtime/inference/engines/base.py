"""What every engine shares: the :class:`Engine` protocol, :class:`EngineError`, the NaN/inf check, ONNX Runtime
session options.

An engine takes a tile ``(1, C_in, X, Y, Z)`` whose spatial sides are divisible by the model's ``spatial_divisor``
and returns float32 logits ``(1, C_out, X, Y, Z)``: ``run`` with host (numpy) arrays; engines that run on the GPU
also have ``run_cupy`` (CuPy arrays in and out, bound by address: no host copy). Every output is checked for
NaN/inf (fp16 paths have produced NaN on some providers): a non-finite output raises :class:`EngineError` instead
of silently producing a wrong segmentation.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from flare.runtime.bundle.manifest import ModelFile, ModelSpec
from flare.runtime.foundation.errors import FlareError
from flare.runtime.inference.device import Array, ort

__all__ = ["Engine", "EngineError", "check_finite", "session_options"]


class EngineError(FlareError):
    """An engine could not be created or produced an unusable output."""


@runtime_checkable
class Engine(Protocol):
    name: str
    backend: str
    precision: str
    out_channels: int

    def run(self, tile: Any) -> Any: ...


def model_file(spec: ModelSpec, precision: str) -> tuple[ModelFile, str]:
    """The file a model runs from for ``precision`` and the precision it really has: the bundle key of that file
    (fp16 falls back to fp32 when the bundle has no fp16 model). Not the file's I/O dtype: fp16 models keep float32
    inputs and outputs (export/fp16.py), so the dtype would call every one of them fp32."""
    return spec.file_for(precision), precision if precision in spec.files else "fp32"


def check_finite(out: Array, xp: ModuleType, path: Path | None, name: str, precision: str, where: str) -> Array:
    """``out`` unchanged, or a one-line EngineError when it holds NaN/inf (checked on ``out``'s own device)."""
    if not bool(xp.isfinite(out).all()):
        raise EngineError(path, f"model {name} ({precision}) produced NaN/inf on {where}; "
                                "use the fp32 model (--precision fp32) or another device")
    return out


def session_options(threads: int | None, optimized_path: Path | None = None) -> Any:
    """ONNX Runtime session options: all graph optimisations, quiet log, ``threads`` intra-op threads (None: ORT's
    default), the optimised graph saved to ``optimized_path`` when given."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so
