"""ONNX Runtime on the CPU: one session per bundle model, host tiles in, float32 logits out."""

from __future__ import annotations

import logging
import os

import numpy as np
from flare.runtime.bundle.manifest import ModelSpec
from flare.runtime.inference.device import ort
from flare.runtime.inference.engines.base import EngineError, check_finite, model_file, session_options
from flare.runtime.inference.engines.contract import check_model_contract

__all__ = ["OrtEngine", "cpu_session_options", "shared_cpu_arena"]

log = logging.getLogger(__name__)
_SHARED_ARENA: list[bool] = []  # [registered?] once per process


def shared_cpu_arena() -> bool:
    """Register one CPU arena in ONNX Runtime's environment (once per process) that every CPU session uses
    (``session.use_env_allocators``): the locator and five folds must not hold six arenas of their largest tile's
    activations (measured: three int8 ``cpu`` folds at 128³ 5969 MB peak RSS with one arena each, 2055 MB with one
    shared). False (one arena per session, and a warning) when this ONNX Runtime cannot."""
    if not _SHARED_ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # no cap, ORT's defaults
            _SHARED_ARENA.append(True)
        except Exception as exc:  # noqa: BLE001 - older/other builds: one arena per session
            log.warning("cannot share one CPU arena between sessions (%s); each model keeps its own",
                        str(exc).splitlines()[0][:160])
            _SHARED_ARENA.append(False)
    return _SHARED_ARENA[0]


def cpu_session_options(threads: int | None) -> object:
    """Session options of every CPU session (measured on the 2-core box, ``docs/cpu.md``):

    - ``threads`` intra-op threads (``$FLARE_THREADS``, else ONNX Runtime's default: one per physical core);
    - no spinning (``$FLARE_ORT_SPIN``, default 0): the tile-major ensemble alternates between the fold sessions on
      every tile, and a session's spinning threads would steal the cores while the next session runs;
    - ONNX Runtime's CPU memory arena on (``$FLARE_ORT_ARENA=0`` turns it off): without it every tile allocates
      and page-faults its activations afresh, measured 1.7x (fp32) to 2.6x (int8) slower per 128³ tile of the
      ``cpu`` network; the arena keeps the largest tile's activations for the life of the process, so it is **one
      arena shared by every session** (:func:`shared_cpu_arena`), not one per fold.
    """
    threads = threads or int(os.environ.get("FLARE_THREADS", "0")) or None
    so = session_options(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("FLARE_ORT_SPIN", "0"))
    so.enable_cpu_mem_arena = os.environ.get("FLARE_ORT_ARENA", "1") != "0"
    if so.enable_cpu_mem_arena and shared_cpu_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")
    return so


class OrtEngine:
    """ONNX Runtime session for one bundle model on the CPU provider."""

    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, precision: str = "fp32", threads: int | None = None) -> None:
        mf, self.precision = model_file(spec, precision)
        self.spec, self.name, self.out_channels = spec, spec.name, spec.out_channels
        self._path = mf.path
        self._input_name, self._output_name = mf.input_name, mf.output_name
        self._in_dtype = np.float16 if mf.input_dtype == "float16" else np.float32
        ort.load()  # a missing onnxruntime is a DependencyError, not a model problem
        try:
            self.session = ort.InferenceSession(str(mf.path), sess_options=cpu_session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(mf.path, f"ONNX Runtime cannot load this model: {str(exc).splitlines()[0]}") from None
        check_model_contract(mf, spec, self.session)  # declared names/types/channels/divisor vs the real model

    def run(self, tile: np.ndarray) -> np.ndarray:
        feed = {self._input_name: np.ascontiguousarray(tile, dtype=self._in_dtype)}
        out = np.asarray(self.session.run([self._output_name], feed)[0], dtype=np.float32)
        return check_finite(out, np, self._path, self.name, self.precision, "the CPU")  # type: ignore[no-any-return]
