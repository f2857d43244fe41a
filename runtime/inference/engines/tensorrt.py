"""Native TensorRT runner behind the ``Engine`` protocol (TensorRT 10 Python API, device memory through CuPy).

**Unverified**: TensorRT could not be installed where this was written; the calls follow the documented TensorRT 10
API (``Runtime.deserialize_cuda_engine``, ``create_execution_context``, the name-based tensor API
``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). ``benchmarks/gpu_check.sh`` runs it when ``import tensorrt`` works. A missing TensorRT or
CuPy is a one-line :class:`~flare.runtime.inference.device.DependencyError`.

Plans are the ones ``flare-export --trt`` writes (``export/trt.py``): ``<bundle>/engines/<sm>-trt<version>/
<onnx sha256>.plan`` with a key file ``<onnx sha256>.json`` (onnx sha256, GPU compute capability, TensorRT version,
precision, profile, plan sha256). :func:`find_plan` accepts a plan only when its key matches this GPU, this TensorRT
and the bundle's ONNX file exactly; otherwise :func:`load_engine` fails with a one-line error that says to run
``flare-export --trt`` again (the runtime does not build engines: building takes minutes and belongs to export).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.bundle.manifest import ModelSpec
from flare.runtime.inference.device import cupy, lazy_import
from flare.runtime.inference.engines.base import EngineError, check_finite

log = logging.getLogger("flare.runtime")

__all__ = ["TrtEngine", "find_plan", "load_engine", "tensorrt"]

tensorrt = lazy_import("tensorrt", hint="pip install tensorrt-cu12 (or tensorrt-cu13 matching your CUDA), or use "
                                        "the ONNX Runtime engines")


def find_plan(spec: ModelSpec, precision: str = "fp16", bundle_root: Path | None = None) -> Path:
    """The plan of ``spec``'s ``precision`` ONNX file for this GPU and TensorRT version, checked against its key
    file; a one-line EngineError when there is none or it is stale."""
    import json

    from flare.runtime.bundle.manifest import sha256_file
    from flare.runtime.inference.engines.ort_cuda import gpu_sm

    trt = tensorrt.load()
    mf = spec.file_for(precision)
    root = bundle_root if bundle_root is not None else mf.path.parent
    folder = root / "engines" / f"{gpu_sm()}-trt{trt.__version__}"
    plan, key_file = folder / f"{mf.sha256}.plan", folder / f"{mf.sha256}.json"
    try:
        key = json.loads(key_file.read_text())
    except (OSError, ValueError):
        raise EngineError(plan, f"no TensorRT engine of {spec.name} for this GPU and TensorRT {trt.__version__}; "
                                "run flare-export --trt on this machine") from None
    expected = {"onnx_sha256": mf.sha256, "sm": gpu_sm(), "tensorrt": str(trt.__version__)}
    if any(key.get(k) != v for k, v in expected.items()) or not plan.is_file() \
            or key.get("plan_sha256") != sha256_file(plan):
        raise EngineError(plan, f"the TensorRT engine of {spec.name} is stale or damaged; run flare-export --trt again")
    return plan


class TrtEngine:
    """A deserialized TensorRT plan: ``run(tile)`` (host arrays) and ``run_cupy(tile)`` (device arrays, bound by
    address, no copy). Output checked for NaN/inf on the device."""

    backend = "tensorrt"

    def __init__(self, plan_path: Path, spec: ModelSpec, precision: str, device_id: int = 0) -> None:
        trt = tensorrt.load()
        cp = cupy.load()
        self.spec, self.name, self.out_channels, self.precision = spec, spec.name, spec.out_channels, precision
        self._path = Path(plan_path)
        self._device = cp.cuda.Device(device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with self._device:
            self.engine = self._runtime.deserialize_cuda_engine(self._path.read_bytes())
            if self.engine is None:
                raise EngineError(plan_path, "TensorRT cannot deserialize this plan (other version or GPU?)")
            self.context = self.engine.create_execution_context()
            self._stream = cp.cuda.Stream(non_blocking=True)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(plan_path, f"expected one input and one output tensor, got {inputs} / {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self._output)))

    def run_cupy(self, tile: Any) -> Any:
        cp = cupy.load()
        with self._device:
            tile = cp.ascontiguousarray(tile, dtype=self._in_dtype)
            if not self.context.set_input_shape(self._input, tuple(tile.shape)):
                raise EngineError(self._path, f"tile shape {tuple(tile.shape)} is outside the engine's profile")
            out_shape = tuple(self.context.get_tensor_shape(self._output))
            out = cp.empty(out_shape, dtype=self._out_dtype)
            self.context.set_tensor_address(self._input, tile.data.ptr)
            self.context.set_tensor_address(self._output, out.data.ptr)
            cp.cuda.get_current_stream().synchronize()  # the tile was written on CuPy's stream
            if not self.context.execute_async_v3(self._stream.ptr):
                raise EngineError(self._path, "TensorRT execution failed (see its log above)")
            self._stream.synchronize()
            return check_finite(out.astype(cp.float32, copy=False), cp, self._path, self.name, self.precision,
                                "TensorRT")

    def run(self, tile: np.ndarray) -> np.ndarray:
        cp = cupy.load()
        with self._device:
            return np.asarray(self.run_cupy(cp.asarray(tile)).get(), dtype=np.float32)


def load_engine(spec: ModelSpec, precision: str = "fp16", *, bundle_root: Path | None = None,
                device_id: int = 0) -> TrtEngine:
    """The TensorRT engine of ``spec`` (see :func:`find_plan`)."""
    return TrtEngine(find_plan(spec, precision, bundle_root), spec, precision, device_id)
