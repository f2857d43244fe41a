"""Inference engines: one tile in, class scores out.

- :mod:`.base` — the :class:`Engine` protocol, :class:`EngineError`, the NaN/inf check;
- :mod:`.ort_cpu` — ONNX Runtime, CPU provider;
- :mod:`.ort_cuda` — ONNX Runtime, CUDA provider (IO binding, arena capped by the memory budget);
- :mod:`.openvino_cpu` — OpenVINO on the CPU (``--engine openvino``, fp32; the ``openvino`` extra);
- :mod:`.contract` — the bundle's declared inputs/outputs checked against the loaded model.

:func:`create_engine` is the one factory. Nothing heavy is imported here: ONNX Runtime, OpenVINO and CuPy load on first use (:func:`flare.runtime.foundation.lazy.lazy_import`).
"""

from __future__ import annotations

from flare.runtime.bundle.manifest import PRECISIONS, ModelSpec
from flare.runtime.inference.device import Device, resolve_device
from flare.runtime.inference.engine_names import CPU_ENGINES, CpuEngine
from flare.runtime.inference.engines.base import Engine, EngineError
from flare.runtime.inference.engines.ort_cpu import OrtEngine

__all__ = ["CPU_ENGINES", "CpuEngine", "Engine", "EngineError", "OrtEngine", "backend_for", "create_engine",
           "default_precision"]



def default_precision(spec: ModelSpec, device: str, engine: str = CPU_ENGINES[0]) -> str:
    """fp16 on CUDA when the bundle has it; int8 on the CPU when the bundle has it (static QDQ models, verified
    against fp32 at export: ONNX Runtime's integer kernels) and the engine is ONNX Runtime; else fp32. A model
    without the file asked for runs its fp32 file (:func:`flare.runtime.inference.engines.base.model_file`)."""
    if device == "cuda":
        return "fp16" if "fp16" in spec.files else "fp32"
    return "int8" if "int8" in spec.files and engine == CPU_ENGINES[0] else "fp32"


def backend_for(device: str) -> str:
    """The backend :func:`create_engine` builds on ``device`` (the memory plan's key; backends are named only
    here, in the engines)."""
    if device == "cuda":
        from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

        return CudaOrtEngine.backend
    return OrtEngine.backend


def create_engine(spec: ModelSpec, device: str | Device = "cpu", precision: str | None = None,
                  threads: int | None = None, *, mem_limit_mb: float | None = None,
                  algo_search: str = "HEURISTIC", engine: str = CPU_ENGINES[0]) -> Engine:
    """Engine for ``spec`` on ``device`` (a name, resolved once by :func:`flare.runtime.inference.device.resolve_device`, or
    a :class:`~flare.runtime.inference.device.Device`). ``mem_limit_mb`` caps ONNX Runtime's CUDA arena (the memory budget),
    ``algo_search`` is cuDNN's convolution algorithm search (HEURISTIC, EXHAUSTIVE or DEFAULT); both are CUDA-only.
    The CUDA provider runs on the device's ``device_id`` (``cuda:N``). ``engine`` picks the CPU engine
    (:data:`CPU_ENGINES`); OpenVINO runs on the CPU only."""
    dev = device if isinstance(device, Device) else resolve_device(device)
    name = dev.name
    if engine not in CPU_ENGINES:
        raise EngineError(None, f"unknown engine {engine!r} (use {', '.join(CPU_ENGINES)})")
    if engine != CPU_ENGINES[0] and name != "cpu":
        raise EngineError(None, f"--engine {engine} runs on the CPU only (--device cpu)")
    precision = precision or default_precision(spec, name, engine)
    if precision not in PRECISIONS:
        raise EngineError(None, f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "int8" and name != "cpu":
        raise EngineError(None, "int8 models run on the CPU only (--device cpu)")
    if name == "cuda":
        from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

        return CudaOrtEngine(spec, precision, mem_limit_mb=mem_limit_mb, algo_search=algo_search, threads=threads,
                             device_id=dev.device_id)
    if engine == CpuEngine.openvino:
        from flare.runtime.inference.engines.openvino_cpu import OvEngine

        return OvEngine(spec, precision=precision, threads=threads)
    return OrtEngine(spec, precision=precision, threads=threads)
