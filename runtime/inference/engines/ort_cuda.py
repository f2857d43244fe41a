"""ONNX Runtime on the GPU: the CUDA provider with IO binding.

Provider options (:func:`cuda_provider_options`):

- ``gpu_mem_limit`` from the memory budget (:func:`flare.runtime.inference.budget.arena_limit_mb`), so that
  ``--gpu-mem-budget`` caps ONNX Runtime's arena itself and a tile that does not fit raises an out-of-memory error
  that :func:`flare.runtime.inference.budget.run_with_fallback` catches;
- ``arena_extend_strategy`` ``kSameAsRequested`` (no power-of-two over-allocation);
- ``cudnn_conv_algo_search``: ``HEURISTIC`` by default (``EXHAUSTIVE`` benchmarks every convolution algorithm on
  the first run of each tile shape: seconds of cold start and extra workspace; ``--cudnn-algo-search`` chooses);
- ``cudnn_conv_use_max_workspace`` 1, ``prefer_nhwc`` 0 for fp16 (the NHWC fp16 path returned NaN on the H100),
  1 for fp32;
- one CUDA arena shared by all fold sessions (:func:`shared_cuda_arena`), capped by the same limit.

CUDA graphs and ONNX Runtime's TensorRT provider were removed: no command reached them and neither was verified
(docs/architecture.md, "Removed").

The engine refuses a CUDA provider that is listed but could not be loaded (missing CUDA/cuDNN libraries make ONNX
Runtime fall back to the CPU silently). Verified here on the CPU side only (errors, options); the GPU paths are run
by ``tests/runtime/inference/test_gpu_runtime.py -m gpu`` through ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.bundle.manifest import ModelSpec
from flare.runtime.inference.device import cupy, cupy_status, ort
from flare.runtime.inference.engine_names import ALGO_SEARCH
from flare.runtime.inference.engines.base import EngineError, check_finite, model_file, session_options
from flare.runtime.inference.engines.contract import check_model_contract

log = logging.getLogger("flare.runtime")

__all__ = [
    "ALGO_SEARCH",
    "CudaOrtEngine",
    "check_provider",
    "cuda_provider_options",
    "shared_cuda_arena",
]

CUDA_EP = "CUDAExecutionProvider"


def check_provider(name: str, path: Path | None = None) -> None:
    """A one-line EngineError unless the installed ONNX Runtime offers provider ``name``."""
    available = ort.get_available_providers()
    if name not in available:
        raise EngineError(path, f"ONNX Runtime {ort.__version__} has no {name} (providers: "
                                f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime "
                                "(pip install 'flare-seg[gpu]')")


def cuda_provider_options(precision: str, *, device_id: int = 0, mem_limit_mb: float | None = None,
                          algo_search: str = "HEURISTIC",
                          extra: dict[str, Any] | None = None) -> dict[str, str]:
    """CUDA provider options (strings, as ONNX Runtime's Python API takes them); ``extra`` overrides."""
    if algo_search not in ALGO_SEARCH:
        raise EngineError(None, f"unknown cudnn_conv_algo_search {algo_search!r} ({', '.join(ALGO_SEARCH)})")
    opts = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "prefer_nhwc": "0" if precision == "fp16" else "1",
    }
    if mem_limit_mb:
        opts["gpu_mem_limit"] = str(int(mem_limit_mb * 1e6))
    opts.update({k: str(v) for k, v in (extra or {}).items()})
    return opts


_SHARED_ARENAS: dict[int, bool] = {}
_ARENA_LIMITS: dict[int, float | None] = {}


def shared_cuda_arena(device_id: int = 0, mem_limit_mb: float | None = None) -> bool:
    """Register one CUDA arena in ONNX Runtime's environment (once per process and device) that every fold session
    uses (``session.use_env_allocators``), capped at ``mem_limit_mb`` (None: no cap) — five folds must not hold five
    arenas. False (per-session arenas, each with the same cap, and a warning) when this ONNX Runtime cannot."""
    if device_id in _SHARED_ARENAS:
        if _ARENA_LIMITS.get(device_id) != mem_limit_mb:
            log.warning("ONNX Runtime's CUDA arena is per process and was capped at %s MB by the first Segmenter; "
                        "this one's %s MB changes its tile choice only, not the arena (use one budget per process)",
                        _ARENA_LIMITS.get(device_id), mem_limit_mb)
        return _SHARED_ARENAS[device_id]
    _ARENA_LIMITS[device_id] = mem_limit_mb
    try:
        info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT)
        cfg = ort.OrtArenaCfg(int(mem_limit_mb * 1e6) if mem_limit_mb else 0, 1, -1, -1)  # 1 = kSameAsRequested
        ort.create_and_register_allocator_v2(CUDA_EP, info, {"device_id": str(device_id)}, cfg)
        _SHARED_ARENAS[device_id] = True
    except Exception as exc:  # noqa: BLE001 - older/other builds: one arena per session
        log.warning("cannot share one CUDA arena between sessions (%s); each fold keeps its own",
                    str(exc).splitlines()[0][:160])
        _SHARED_ARENAS[device_id] = False
    return _SHARED_ARENAS[device_id]


class CudaOrtEngine:
    """One bundle model on ONNX Runtime's CUDA provider.

    ``run(tile)``: host tile in, host float32 logits out (IO binding: one copy up, one back). ``run_cupy(tile)``:
    CuPy tile in, CuPy float32 logits out, bound by device address (no host copy)."""

    backend = "onnxruntime-cuda"
    provider = CUDA_EP

    def __init__(self, spec: ModelSpec, precision: str = "fp16", provider_options: dict[str, Any] | None = None, *,
                 device_id: int = 0, mem_limit_mb: float | None = None,
                 algo_search: str = "HEURISTIC", threads: int | None = None, share_arena: bool = True) -> None:
        mf, self.precision = model_file(spec, precision)
        check_provider(self.provider, mf.path)
        so = session_options(threads)
        if self.provider == CUDA_EP:  # every node on the GPU, or a one-line error: no silent CPU placement
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if share_arena and shared_cuda_arena(device_id, mem_limit_mb):
            so.add_session_config_entry("session.use_env_allocators", "1")
        self.spec, self.name, self.out_channels = spec, spec.name, spec.out_channels
        self.device_id, self._path = device_id, mf.path
        self._input_name, self._output_name = mf.input_name, mf.output_name
        self._in_dtype = np.dtype(np.float16 if mf.input_dtype == "float16" else np.float32)
        self._out_dtype = np.dtype(np.float16 if mf.output_dtype == "float16" else np.float32)
        self.cuda_options = cuda_provider_options(self.precision, device_id=device_id, mem_limit_mb=mem_limit_mb,
                                                  algo_search=algo_search, extra=provider_options)
        try:
            self.session = ort.InferenceSession(str(mf.path), sess_options=so,
                                                providers=[(CUDA_EP, self.cuda_options), "CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(mf.path, f"ONNX Runtime cannot load this model on {self.provider}: "
                                       f"{str(exc).splitlines()[0][:300]}") from None
        active = self.session.get_providers()
        if not active or active[0] != self.provider:
            raise EngineError(mf.path, f"{self.provider} is installed but could not be loaded (active: "
                                       f"{', '.join(active)}); check the CUDA/cuDNN libraries (import torch first, "
                                       "or put them on LD_LIBRARY_PATH)")
        check_model_contract(mf, spec, self.session, probe=False)  # declared names/types/channels vs the model
        self._binding = self.session.io_binding()
        self._run_options: Any = None
        self._in_buf: Any = None
        self._out_buf: Any = None

    def _providers(self, cuda_opts: dict[str, str]) -> list[Any]:
        return [(CUDA_EP, cuda_opts), "CPUExecutionProvider"]

    def shrink_arena(self) -> None:
        """After an out-of-memory error: every later run returns the arena's unused chunks to the device at its
        end (ONNX Runtime's ``memory.enable_memory_arena_shrinkage``), so the smaller retry tiles start from a
        smaller footprint. Unmeasured on a GPU."""
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{self.device_id}")
        self._run_options = ro

    def run(self, tile: np.ndarray) -> np.ndarray:
        """Host tile in, host float32 logits out (with CuPy: through :meth:`run_cupy`)."""
        tile = np.ascontiguousarray(tile, dtype=self._in_dtype)
        if cupy_status()[0]:  # a working CuPy: device arrays, bound by address
            return np.asarray(self.run_cupy(cupy.asarray(tile)).get(), dtype=np.float32)
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input(self._input_name, tile)
        io.bind_output(self._output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(io, self._run_options)
        out = np.asarray(io.copy_outputs_to_cpu()[0], dtype=np.float32)
        return check_finite(out, np, self._path, self.name, self.precision, self.provider)  # type: ignore[no-any-return]

    def run_cupy(self, tile: Any) -> Any:
        """CuPy tile ``(1, C_in, X, Y, Z)`` in, CuPy float32 logits ``(1, C_out, X, Y, Z)`` out, both bound by
        address."""
        cp = cupy.load()
        tile = cp.ascontiguousarray(tile, dtype=self._in_dtype)
        out = cp.empty((tile.shape[0], self.out_channels) + tuple(tile.shape[2:]), self._out_dtype)
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_input(self._input_name, "cuda", self.device_id, self._in_dtype, list(tile.shape), tile.data.ptr)
        io.bind_output(self._output_name, "cuda", self.device_id, self._out_dtype, list(out.shape), out.data.ptr)
        cp.cuda.get_current_stream().synchronize()  # ONNX Runtime computes on its own stream
        self.session.run_with_iobinding(io, self._run_options)  # returns once its stream has finished
        out = out.astype(cp.float32, copy=False)  # a copy only for fp16 logits
        return check_finite(out, cp, self._path, self.name, self.precision, self.provider)

