"""ONNX Runtime on the CPU: one session per bundle model, host tiles in, float32 logits out."""

from __future__ import annotations

import os

import numpy as np
from flare.runtime.bundle.manifest import ModelSpec
from flare.runtime.inference.device import ort
from flare.runtime.inference.engines.base import EngineError, check_finite, model_file, session_options
from flare.runtime.inference.engines.contract import check_model_contract

__all__ = ["OrtEngine", "cpu_session_options"]


def cpu_session_options(threads: int | None) -> object:
    """Session options of every CPU session (measured on the 2-core box, ``docs/cpu.md``):

    - ``threads`` intra-op threads (``$FLARE_THREADS``, else ONNX Runtime's default: one per physical core);
    - no spinning (``$FLARE_ORT_SPIN``, default 0): the tile-major ensemble alternates between the fold sessions on
      every tile, and a session's spinning threads would steal the cores while the next session runs;
    - ONNX Runtime's CPU memory arena on (``$FLARE_ORT_ARENA=0`` turns it off): without it every tile allocates
      and page-faults its activations afresh, measured 1.7x (fp32) to 2.6x (int8) slower per 128³ tile of the
      ``cpu`` network; with it each session keeps its largest tile's activations for the life of the process (one
      arena per fold and the locator: peak RSS grows with the number of folds; one shared arena is the follow-up).
    """
    threads = threads or int(os.environ.get("FLARE_THREADS", "0")) or None
    so = session_options(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("FLARE_ORT_SPIN", "0"))
    so.enable_cpu_mem_arena = os.environ.get("FLARE_ORT_ARENA", "1") != "0"
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
