"""OpenVINO on the CPU (``--engine openvino``): one compiled model per bundle model, host tiles in, float32 logits out.

Why it is offered (measured on the 2-core AMD EPYC box, ``docs/cpu.md``, ``benchmarks/RESULTS.md``): on the ``cpu``
profile's network (16 filters, 3 mm, 128³ tiles) OpenVINO's fp32 takes 1.65 s per tile where ONNX Runtime's takes
2.46 s (the whole FLARE-size case: 9.7 s against 11.7 s); on the flare23 network 1.3x, where ONNX Runtime's int8 is
faster still. On an earlier host the two fp32 engines were even: the gain is the CPU's, measure it there. It reads
the bundle's ONNX files as they are.

- **fp32 only.** The int8 files were verified at export against ONNX Runtime's integer kernels; OpenVINO's are
  others, so running them here would skip the verification. Asking for int8 (or fp16) is a one-line error.
- **Precision as written**: ``INFERENCE_PRECISION_HINT`` f32 (OpenVINO would otherwise pick bf16 on CPUs with AMX).
- **Memory**: a compiled model keeps its activations after a run; :meth:`OvEngine.run` releases them
  (``CompiledModel.release_memory``), so five folds hold one tile's activations at a time, as ONNX Runtime's one
  shared arena does (measured: five folds at 128³ 1.7 GB peak RSS with the release, 4.1 GB without).
- **Threads**: ``threads``, else ``$FLARE_THREADS``, else OpenVINO's default (one per physical core).
- The bundle's declared contract (names, element types, channels, divisor) is checked as for ONNX Runtime.
- **No fork after it**: OpenVINO's CPU plugin keeps a TBB thread pool, which is not fork-safe; a process that forked
  after running it (torch DataLoader workers in the test suite) deadlocked or crashed. flare's own commands start
  their children with fork + exec or spawn; a program using this engine should do the same (``multiprocessing``'s
  ``spawn`` context).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from flare.runtime.bundle.manifest import ModelSpec
from flare.runtime.foundation.lazy import lazy_import
from flare.runtime.inference.engines.base import EngineError, check_finite, model_file
from flare.runtime.inference.engines.contract import check_model_contract

__all__ = ["OvEngine", "compile_model", "openvino"]

openvino = lazy_import("openvino", "openvino")

_ORT_TYPE = {"f32": "tensor(float)", "f16": "tensor(float16)"}


class _Contract:
    """The compiled model seen through the three calls :func:`check_model_contract` makes of an ONNX Runtime
    session (``get_inputs``, ``get_outputs``, ``run``), so that one check serves both engines."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled

    @staticmethod
    def _arg(port: Any, name: str) -> SimpleNamespace:
        dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        kind = port.get_element_type()
        return SimpleNamespace(name=name, type=_ORT_TYPE.get(kind.get_type_name(), str(kind)), shape=dims)

    def get_inputs(self) -> list[SimpleNamespace]:
        return [self._arg(p, p.get_any_name()) for p in self._compiled.inputs]

    def get_outputs(self) -> list[SimpleNamespace]:  # an output port may carry several tensor names
        return [self._arg(p, n) for p in self._compiled.outputs for n in sorted(p.get_names())]

    def run(self, names: list[str], feed: dict[str, np.ndarray], run_options: Any = None) -> list[np.ndarray]:
        (tile,) = feed.values()
        result = self._compiled({0: tile})
        self._compiled.release_memory()
        return [np.asarray(result[self._compiled.output(n)]) for n in names]


def compile_model(path: Path, threads: int | None = None) -> Any:
    """The ONNX file at ``path`` compiled for OpenVINO's CPU plugin with the engine's settings (f32, latency,
    ``threads`` or ``$FLARE_THREADS`` or OpenVINO's default); also what ``benchmarks/cpu_sweep.py`` times."""
    threads = threads or int(os.environ.get("FLARE_THREADS", "0")) or None
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return openvino.Core().compile_model(str(path), "CPU", config)


class OvEngine:
    """OpenVINO compiled model for one bundle model on the CPU (fp32)."""

    backend = "openvino"

    def __init__(self, spec: ModelSpec, precision: str = "fp32", threads: int | None = None) -> None:
        if precision != "fp32":
            raise EngineError(None, f"--engine openvino runs the fp32 models only ({precision} asked for: the "
                                    "bundle's fp16 and int8 models are verified on ONNX Runtime); use --precision "
                                    "fp32 or --engine onnxruntime")
        mf, self.precision = model_file(spec, "fp32")
        self.spec, self.name, self.out_channels = spec, spec.name, spec.out_channels
        self._path: Path = mf.path
        openvino.load()  # a missing openvino is a DependencyError naming the extra, not a model problem
        try:
            self._compiled = compile_model(mf.path, threads)
        except Exception as exc:  # noqa: BLE001 - openvino raises its own exception types
            raise EngineError(mf.path, "OpenVINO cannot load this model: "
                                       f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from None
        check_model_contract(mf, spec, _Contract(self._compiled))
        self._output = self._compiled.output(mf.output_name)

    def run(self, tile: np.ndarray) -> np.ndarray:
        result = self._compiled({0: np.ascontiguousarray(tile, dtype=np.float32)})
        out = np.array(result[self._output], dtype=np.float32)  # a copy: the release below frees OpenVINO's buffer
        self._compiled.release_memory()
        return check_finite(out, np, self._path, self.name, self.precision, "the CPU (OpenVINO)")  # type: ignore[no-any-return]
