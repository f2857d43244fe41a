"""ONNX Runtime on the GPU: the CUDA provider with IO binding, and the TensorRT provider, behind the ``Engine``
protocol of :mod:`flare.runtime.engines`.

Provider options (:func:`cuda_provider_options`) are tuned from the H100 measurements in
``BENCHMARKS-ANCHORS.md``:

- ``cudnn_conv_algo_search``: ``HEURISTIC`` by default (the measured sweep; ``EXHAUSTIVE`` benchmarks every conv
  algorithm on the first run of each shape, which costs seconds of cold start and workspace memory);
- ``cudnn_conv_use_max_workspace`` 1 (made no difference to peak memory, lets cuDNN pick faster algorithms);
- ``arena_extend_strategy`` ``kSameAsRequested`` (no power-of-two over-allocation) and ``gpu_mem_limit`` from the
  memory budget, so the arena itself raises an out-of-memory error that :mod:`flare.runtime.budget` catches;
- ``prefer_nhwc`` 0 for fp16 (the NHWC fp16 path returned NaN on the H100), 1 for fp32 (correct and 1.3× faster);
- one CUDA arena shared by all fold sessions (:func:`shared_cuda_arena`), so five folds do not hold five arenas;
- ``enable_cuda_graph`` only with a fixed tile shape (``fixed_shape``): the graph is captured on the first run
  and replayed, which needs the same input/output addresses every run — the engine then keeps its own device
  buffers.

Every output is checked for NaN/inf (on the device when CuPy is there). The engines fail with a one-line
:class:`~flare.runtime.engines.EngineError` when ONNX Runtime has no CUDA (or TensorRT) provider, or when the
provider is listed but could not be loaded (missing CUDA/cuDNN libraries make ONNX Runtime fall back to the CPU
silently; this engine refuses that instead).

Verified here only on the CPU side (errors, option building); the GPU paths are exercised by
``tests/test_gpu_runtime.py -m gpu`` through ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import ModelSpec
from .bundle_contract import check_model_contract
from .engines import EngineError, _import_ort, _session_options

log = logging.getLogger("flare.runtime")

__all__ = [
    "CudaOrtEngine",
    "TrtOrtEngine",
    "check_provider",
    "cuda_provider_options",
    "gpu_sm",
    "shared_cuda_arena",
    "trt_provider_options",
]

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"


def check_provider(name: str, path: Path | None = None) -> Any:
    """The onnxruntime module, after checking that it offers provider ``name`` (else a one-line EngineError)."""
    ort = _import_ort()
    available = ort.get_available_providers()
    if name not in available:
        hint = ("install onnxruntime-gpu instead of onnxruntime (pip install 'flare-seg[gpu]')" if name == CUDA_EP
                else "use an onnxruntime-gpu build with TensorRT and the TensorRT libraries on LD_LIBRARY_PATH")
        raise EngineError(path, f"ONNX Runtime {ort.__version__} has no {name} (providers: "
                                f"{', '.join(available)}); {hint}")
    return ort


def cuda_provider_options(precision: str, *, device_id: int = 0, mem_limit_mb: float | None = None,
                          cuda_graph: bool = False, algo_search: str = "HEURISTIC",
                          extra: dict[str, Any] | None = None) -> dict[str, str]:
    """CUDA provider options (strings, as ONNX Runtime's Python API takes them); ``extra`` overrides."""
    if algo_search not in ("HEURISTIC", "EXHAUSTIVE", "DEFAULT"):
        raise EngineError(None, f"unknown cudnn_conv_algo_search {algo_search!r} (HEURISTIC, EXHAUSTIVE, DEFAULT)")
    opts = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "prefer_nhwc": "0" if precision == "fp16" else "1",
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }
    if mem_limit_mb is not None:
        opts["gpu_mem_limit"] = str(int(mem_limit_mb * 1e6))
    opts.update({k: str(v) for k, v in (extra or {}).items()})
    return opts


def gpu_sm(device_id: int = 0) -> str:
    """``sm90`` style name of the GPU's compute capability (via CuPy), ``sm-unknown`` without it."""
    try:
        import cupy

        return f"sm{cupy.cuda.Device(device_id).compute_capability}"
    except Exception:  # noqa: BLE001 - no CuPy or no device: only a cache folder name
        return "sm-unknown"


def trt_provider_options(spec: ModelSpec, precision: str, *, cache_root: Path | None = None, device_id: int = 0,
                         max_side: int = 224, workspace_mb: int = 2048) -> dict[str, str]:
    """TensorRT provider options: fp16 when asked, engine and timing caches under
    ``<bundle>/engines/<sm>-ort-trt/<onnx sha256[:16]>/`` (a changed ONNX file gets a new folder: rebuild, never a
    stale engine), one dynamic-shape profile from 16³ to ``max_side``³."""
    mf = spec.file_for(precision)
    root = cache_root if cache_root is not None else mf.path.parent / "engines"
    cache = root / f"{gpu_sm(device_id)}-ort-trt" / mf.sha256[:16]
    cache.mkdir(parents=True, exist_ok=True)
    c = spec.in_channels
    shape = lambda side: f"{mf.input_name}:1x{c}x{side}x{side}x{side}"
    return {
        "device_id": str(device_id),
        "trt_fp16_enable": "1" if precision == "fp16" else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": str(workspace_mb << 20),
        "trt_profile_min_shapes": shape(16),
        "trt_profile_opt_shapes": shape(min(160, max_side)),
        "trt_profile_max_shapes": shape(max_side),
    }


_SHARED_ARENAS: dict[int, bool] = {}


def shared_cuda_arena(device_id: int = 0, mem_limit_mb: float | None = None) -> bool:
    """Register one CUDA arena allocator in ONNX Runtime's environment (once per process and device) so that all
    fold sessions share it (``session.use_env_allocators``) instead of each keeping its own arena sized for the
    largest tile — five folds would otherwise hold five times the activation memory. ``mem_limit_mb`` caps it
    (0/None: no cap). Returns False (per-session arenas, with a warning) when this ONNX Runtime cannot do it."""
    if device_id in _SHARED_ARENAS:
        return _SHARED_ARENAS[device_id]
    ort = _import_ort()
    try:
        info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT)
        max_mem = int(mem_limit_mb * 1e6) if mem_limit_mb else 0
        cfg = ort.OrtArenaCfg(max_mem, 1, -1, -1)  # arena_extend_strategy 1 = kSameAsRequested
        ort.create_and_register_allocator_v2(CUDA_EP, info, {"device_id": str(device_id)}, cfg)
        _SHARED_ARENAS[device_id] = True
    except Exception as exc:  # noqa: BLE001 - older/other builds: fall back to one arena per session
        log.warning("cannot share one CUDA arena between sessions (%s); each fold keeps its own",
                    str(exc).splitlines()[0][:160])
        _SHARED_ARENAS[device_id] = False
    return _SHARED_ARENAS[device_id]


class CudaOrtEngine:
    """One bundle model on ONNX Runtime's CUDA provider.

    ``run(tile)`` takes and returns host arrays (IO binding: host input, device output, one copy back);
    ``run_cupy(tile)`` takes and returns CuPy arrays (no host copy at all); ``run_device(ort_value)`` takes and
    returns ONNX Runtime ``OrtValue`` objects on the device."""

    backend = "onnxruntime-cuda"
    provider = CUDA_EP

    def __init__(self, spec: ModelSpec, precision: str = "fp16", provider_options: dict[str, Any] | None = None, *,
                 device_id: int = 0, mem_limit_mb: float | None = None, fixed_shape: tuple[int, int, int] | None = None,
                 algo_search: str = "HEURISTIC", threads: int | None = None, share_arena: bool = True) -> None:
        mf = spec.file_for(precision)
        ort = check_provider(self.provider, mf.path)
        so = _session_options(threads)
        if share_arena and shared_cuda_arena(device_id, mem_limit_mb):
            so.add_session_config_entry("session.use_env_allocators", "1")
        self.spec, self.name, self.out_channels = spec, spec.name, spec.out_channels
        self.precision = "fp16" if precision == "fp16" and "fp16" in spec.files else "fp32"
        self.device_id = device_id
        self.fixed_shape = fixed_shape
        self._path = mf.path
        self._input_name, self._output_name = mf.input_name, mf.output_name
        self._in_dtype = np.dtype(np.float16 if mf.input_dtype == "float16" else np.float32)
        self._out_dtype = np.dtype(np.float16 if mf.output_dtype == "float16" else np.float32)
        cuda_opts = cuda_provider_options(self.precision, device_id=device_id, mem_limit_mb=mem_limit_mb,
                                          cuda_graph=fixed_shape is not None, algo_search=algo_search,
                                          extra=provider_options)
        providers = self._providers(cuda_opts)
        try:
            self.session = ort.InferenceSession(str(mf.path), sess_options=so, providers=providers)
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
        self._in_buf: Any = None
        self._out_buf: Any = None

    def _providers(self, cuda_opts: dict[str, str]) -> list[Any]:
        return [(CUDA_EP, cuda_opts), "CPUExecutionProvider"]

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (in_shape[0], self.out_channels) + tuple(in_shape[2:])

    def _nonfinite(self) -> EngineError:
        return EngineError(self._path, f"model {self.name} ({self.precision}) produced NaN/inf on "
                                       f"{self.provider}; use --precision fp32 or another device")

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if self.fixed_shape is not None and tuple(shape[2:]) != tuple(self.fixed_shape):
            raise EngineError(self._path, f"this engine was built for tiles of {self.fixed_shape} (CUDA graph), "
                                          f"got {tuple(shape[2:])}")

    # -- Engine protocol -------------------------------------------------------------------------------------------
    def run(self, tile: np.ndarray) -> np.ndarray:
        """Host tile in, host float32 logits out (input copied up once, logits copied back once)."""
        tile = np.ascontiguousarray(tile, dtype=self._in_dtype)
        self._check_shape(tile.shape)
        if cupy_ok():
            import cupy

            return np.asarray(self.run_cupy(cupy.asarray(tile)).get(), dtype=np.float32)
        io = self._binding
        if self.fixed_shape is not None:  # CUDA graph: the same device buffers every run
            if self._in_buf is None:
                ort = _import_ort()
                self._in_buf = ort.OrtValue.ortvalue_from_shape_and_type(tile.shape, self._in_dtype, "cuda",
                                                                         self.device_id)
                self._out_buf = ort.OrtValue.ortvalue_from_shape_and_type(self._out_shape(tile.shape),
                                                                          self._out_dtype, "cuda", self.device_id)
                io.bind_ortvalue_input(self._input_name, self._in_buf)
                io.bind_ortvalue_output(self._output_name, self._out_buf)
            self._in_buf.update_inplace(tile)
            self.session.run_with_iobinding(io)
            out = np.asarray(self._out_buf.numpy(), dtype=np.float32)
        else:
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            io.bind_cpu_input(self._input_name, tile)
            io.bind_output(self._output_name, "cuda", self.device_id)
            self.session.run_with_iobinding(io)
            out = np.asarray(io.copy_outputs_to_cpu()[0], dtype=np.float32)
        if not np.isfinite(out).all():
            raise self._nonfinite()
        return out

    def run_cupy(self, tile: Any) -> Any:
        """CuPy tile ``(1, C_in, X, Y, Z)`` in, CuPy logits ``(1, C_out, X, Y, Z)`` out, both on the device, bound
        by pointer (no copy). With a fixed shape (CUDA graph) the tile is copied into the engine's own input buffer
        and the returned array is the engine's output buffer: use it before the next call."""
        import cupy

        tile = cupy.ascontiguousarray(tile, dtype=self._in_dtype)
        self._check_shape(tile.shape)
        if self.fixed_shape is not None:
            if self._in_buf is None:
                self._in_buf = cupy.empty(tile.shape, self._in_dtype)
                self._out_buf = cupy.empty(self._out_shape(tile.shape), self._out_dtype)
            cupy.copyto(self._in_buf, tile)
            tile, out = self._in_buf, self._out_buf
        else:
            out = cupy.empty(self._out_shape(tile.shape), self._out_dtype)
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_input(self._input_name, "cuda", self.device_id, self._in_dtype, list(tile.shape), tile.data.ptr)
        io.bind_output(self._output_name, "cuda", self.device_id, self._out_dtype, list(out.shape), out.data.ptr)
        cupy.cuda.get_current_stream().synchronize()  # ONNX Runtime computes on its own stream
        self.session.run_with_iobinding(io)  # returns once its stream has finished
        if out.dtype != cupy.float32:
            out = out.astype(cupy.float32)
        if not bool(cupy.isfinite(out).all()):
            raise self._nonfinite()
        return out

    def run_device(self, value: Any) -> Any:
        """``OrtValue`` on the device in, ``OrtValue`` of the logits on the device out (ONNX Runtime allocates it in
        its arena). Checked for NaN/inf through CuPy when available."""
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_ortvalue_input(self._input_name, value)
        io.bind_output(self._output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()[0]
        if cupy_ok() and not _ortvalue_finite(out):
            raise self._nonfinite()
        return out


class TrtOrtEngine(CudaOrtEngine):
    """One bundle model on ONNX Runtime's TensorRT provider (CUDA provider behind it for unsupported nodes), engine
    cache under the bundle's ``engines/`` folder. Unverified: TensorRT could not be installed where this was
    written."""

    backend = "onnxruntime-trt"
    provider = TRT_EP

    def __init__(self, spec: ModelSpec, precision: str = "fp16", provider_options: dict[str, Any] | None = None, *,
                 cache_root: Path | None = None, max_side: int = 224, **kwargs: Any) -> None:
        self._trt_opts = {"spec": spec, "precision": precision, "cache_root": cache_root, "max_side": max_side,
                          "device_id": kwargs.get("device_id", 0)}
        self._trt_extra = provider_options or {}
        super().__init__(spec, precision, None, **kwargs)

    def _providers(self, cuda_opts: dict[str, str]) -> list[Any]:
        o = self._trt_opts
        trt = trt_provider_options(o["spec"], o["precision"], cache_root=o["cache_root"], device_id=o["device_id"],
                                   max_side=o["max_side"])
        trt.update({k: str(v) for k, v in self._trt_extra.items()})
        return [(TRT_EP, trt), (CUDA_EP, cuda_opts), "CPUExecutionProvider"]


def cupy_ok() -> bool:
    from .gpu import cupy_available

    return cupy_available()


def _ortvalue_finite(value: Any) -> bool:
    """NaN/inf check of a device ``OrtValue`` without copying it to the host (CuPy view of its memory)."""
    import cupy

    dtype = np.dtype(np.float16 if "float16" in value.data_type() else np.float32)
    shape = tuple(value.shape())
    n = int(np.prod(shape)) * dtype.itemsize
    mem = cupy.cuda.UnownedMemory(value.data_ptr(), n, value)
    arr = cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0))
    return bool(cupy.isfinite(arr).all())
