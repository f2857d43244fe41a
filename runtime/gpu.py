"""Device-resident stages with CuPy — the same code runs on the host with ``xp=numpy``.

On a GPU the whole inference chain stays on the device: the raw crop (int16) is uploaded once
(:func:`crop_resample_xp`: resample, then normalise, on the device), every fold's blended softmax is added in place
into one fp16 accumulator (:class:`ProbAccumulator`), the argmax is taken on the device and only the uint8 labels
come back (:func:`infer_ensemble_xp`). Tiles go to the engine as device arrays (``run_cupy`` of
:class:`flare.runtime.cuda_engine.CudaOrtEngine` and :class:`flare.runtime.trt_engine.TrtEngine`, through ONNX
Runtime's IO binding or TensorRT tensor addresses); an engine without ``run_cupy`` gets a host round trip.

Every function takes the array module ``xp`` (``numpy`` or ``cupy``) and follows the conventions of
``docs/ARCHITECTURE.md`` (align-centres linear resampling, ``clip((x - lo) / (hi - lo), 0, 1)``, the MONAI tile
scheme of :mod:`flare.runtime.tiling`). With ``xp=numpy`` and a float32 accumulator, :func:`infer_ensemble_xp`
gives exactly the labels of :func:`flare.runtime.ensemble.infer_ensemble` (a test holds it to that).

CuPy is optional: :func:`cupy_available` is False without it or without a CUDA device, and callers then use the
host path. Nothing here imports torch; CuPy is imported only inside functions.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from .ensemble import EnsembleResult, Progress, abdominal_z_range, tile_to_target
from .tiling import TilePlan, effective_roi, importance_map, plan_tiles

log = logging.getLogger("flare.runtime")

__all__ = [
    "DeviceMemoryPeak",
    "ProbAccumulator",
    "argmax_uint8",
    "crop_resample_xp",
    "cupy_available",
    "cupy_status",
    "device_memory_used_mb",
    "get_xp",
    "infer_ensemble_xp",
    "infer_with_budget",
    "normalise_hu_xp",
    "resample_linear_xp",
    "sliding_window_xp",
    "softmax_xp_",
    "tile_runner",
    "to_host",
]

Array = Any  # numpy.ndarray or cupy.ndarray
TileRunner = Callable[[Array], Array]


@functools.lru_cache(maxsize=1)
def cupy_status() -> tuple[bool, str]:
    """``(usable, why)``: CuPy imports, sees a CUDA device and can run a kernel on it."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install raising at import
        return False, f"CuPy is not installed ({exc.__class__.__name__})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "CuPy sees no CUDA device"
        float((cupy.arange(4, dtype=cupy.float32) * 2).sum())  # compiles and runs one kernel
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means: not usable
        return False, f"CuPy cannot use the CUDA device ({str(exc).splitlines()[0][:120]})"
    return True, f"CuPy {cupy.__version__}, {n} CUDA device(s)"


def cupy_available() -> bool:
    """True when CuPy is installed and a CUDA device works (cached)."""
    return cupy_status()[0]


def get_xp(device: str) -> ModuleType:
    """``numpy`` for ``cpu``; ``cupy`` for ``cuda`` when :func:`cupy_available`, else ``numpy`` (host stages)."""
    if device == "cuda" and cupy_available():
        import cupy

        return cupy
    return np


def to_host(arr: Array) -> np.ndarray:
    """A numpy array of ``arr`` (one device→host copy for CuPy arrays, no copy for numpy)."""
    get = getattr(arr, "get", None)
    return get() if callable(get) and not isinstance(arr, np.ndarray) else np.asarray(arr)


# -- resampling and intensity --------------------------------------------------------------------------------------
def _linear_axis(arr: Array, n_out: int, axis: int, xp: ModuleType) -> Array:
    """Linear resampling of one axis, align-centres convention: output ``o`` samples input coordinate
    ``(o + 0.5) * n_in / n_out - 0.5`` clamped to ``[0, n_in - 1]``."""
    n_in = arr.shape[axis]
    coord = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(coord).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * arr.ndim
    shape[axis] = n_out
    w1 = xp.asarray((coord - i0).astype(np.float32).reshape(shape))
    lo = xp.take(arr, xp.asarray(i0), axis=axis)
    hi = xp.take(arr, xp.asarray(i1), axis=axis)
    hi -= lo
    hi *= w1
    lo += hi
    return lo


def resample_linear_xp(arr: Array, out_shape: Sequence[int], xp: ModuleType = np) -> Array:
    """Separable linear resampling of a 3-D array to ``out_shape`` (float32), on the device of ``xp``.

    Axes that shrink are done first, so that the intermediate arrays stay small."""
    out = xp.asarray(arr).astype(xp.float32, copy=False)
    order = sorted(range(out.ndim), key=lambda a: out_shape[a] / out.shape[a])
    for axis in order:
        if out.shape[axis] != int(out_shape[axis]):
            out = _linear_axis(out, int(out_shape[axis]), axis, xp)
    if out is arr:
        out = out.copy()
    return out


def normalise_hu_xp(arr: Array, window: tuple[float, float] = (-250.0, 250.0), xp: ModuleType = np) -> Array:
    """``clip((x - lo) / (hi - lo), 0, 1)`` in float32, in place when ``arr`` is float32 already."""
    lo, hi = float(window[0]), float(window[1])
    out = xp.asarray(arr).astype(xp.float32, copy=False)
    out -= lo
    out /= hi - lo
    xp.clip(out, 0.0, 1.0, out=out)
    return out


def crop_resample_xp(region: np.ndarray, out_shape: Sequence[int], hu_window: tuple[float, float],
                     xp: ModuleType = np) -> Array:
    """Upload the raw crop once (its own dtype, e.g. int16), resample it to ``out_shape`` and normalise it, on the
    device of ``xp`` — the device twin of the pipeline's ``normalise_hu(resample_linear(region, shape))``."""
    dev = xp.asarray(np.ascontiguousarray(region))
    vol = resample_linear_xp(dev, out_shape, xp)
    del dev
    return normalise_hu_xp(vol, hu_window, xp)


# -- probabilities -------------------------------------------------------------------------------------------------
def softmax_xp_(logits: Array, xp: ModuleType = np, axis: int = 0) -> Array:
    """Softmax over ``axis`` in place (float32), same operation order as ``ensemble.softmax_``."""
    logits -= logits.max(axis=axis, keepdims=True)
    xp.exp(logits, out=logits)
    logits /= logits.sum(axis=axis, keepdims=True)
    return logits


def argmax_uint8(acc: Array, xp: ModuleType = np) -> Array:
    """Class index of the largest accumulated probability, uint8 (on the device of ``acc``)."""
    return acc.argmax(axis=0).astype(xp.uint8)


class ProbAccumulator:
    """The folds' blended probabilities ``(C, X, Y, Z)``, added in place (fp16 on the device by default: 2 bytes
    per class and voxel; float32 reproduces the host ensemble exactly)."""

    def __init__(self, channels: int, shape: Sequence[int], xp: ModuleType = np, dtype: Any = None) -> None:
        self.xp = xp
        self.data = xp.zeros((int(channels),) + tuple(int(s) for s in shape), dtype=dtype or xp.float16)

    def view_z(self, z0: int, z1: int) -> Array:
        return self.data[:, :, :, z0:z1]

    def argmax(self) -> Array:
        return argmax_uint8(self.data, self.xp)


# -- tiled inference -----------------------------------------------------------------------------------------------
def _axis_weight_sums(plan: TilePlan) -> list[np.ndarray]:
    """Per axis, how many tiles cover each padded position (constant blending: the weight sum is their product)."""
    sums = []
    for axis in range(3):
        count = np.zeros(plan.padded_shape[axis], dtype=np.float32)
        for s in sorted({start[axis] for start in plan.starts}):
            count[s:s + plan.roi[axis]] += 1.0
        sums.append(count)
    return sums


class _Normaliser:
    """``weight / wsum[tile]`` for each tile of a plan. Constant blending: ``1 / (cx * cy * cz)`` from per-axis
    counts (no volume-sized array; exact, the counts are small integers). Gaussian: a device-resident weight sum,
    as in ``ensemble.sliding_window``."""

    def __init__(self, plan: TilePlan, blend: str, xp: ModuleType) -> None:
        self.plan, self.xp, self.blend = plan, xp, blend
        self.weight = xp.asarray(importance_map(plan.roi, blend))
        if blend == "constant":
            self.axis = [xp.asarray(c) for c in _axis_weight_sums(plan)]
            self.wsum = None
        else:
            self.wsum = xp.zeros(plan.padded_shape, dtype=xp.float32)
            for start in plan.starts:
                self.wsum[plan.slices(start)] += self.weight

    def factor(self, start: tuple[int, int, int]) -> Array:
        sl = self.plan.slices(start)
        if self.wsum is not None:
            return self.weight / self.wsum[sl]
        cx, cy, cz = (a[s] for a, s in zip(self.axis, sl))
        return self.weight / (cx[:, None, None] * cy[None, :, None] * cz[None, None, :])


def _pad_xp(volume: Array, plan: TilePlan, xp: ModuleType) -> Array:
    if plan.padded_shape == plan.shape:
        return volume
    pads = [(b, p - s - b) for b, p, s in zip(plan.pad_before, plan.padded_shape, plan.shape)]
    return xp.pad(volume, pads)


def sliding_window_xp(volume: Array, run_tile: TileRunner, roi: Sequence[int], out: Array, xp: ModuleType = np, *,
                      overlap: float = 0.0, blend: str = "constant", activation: str = "softmax",
                      progress: Progress | None = None, divisor: int = 16,
                      on_tile: Callable[[], None] | None = None) -> TilePlan:
    """Device twin of :func:`flare.runtime.ensemble.sliding_window`: run ``run_tile`` over ``volume`` (X, Y, Z
    float32) tile by tile and **add** the blended, plan-normalised outputs to ``out`` (C, X, Y, Z; any float dtype,
    in place). ``on_tile`` runs after each tile (memory sampling)."""
    plan = plan_tiles(volume.shape, effective_roi(volume.shape, tuple(roi), divisor), overlap)
    norm = _Normaliser(plan, blend, xp)
    padded = _pad_xp(volume, plan, xp)
    for start in plan.starts:
        tile = xp.ascontiguousarray(padded[plan.slices(start)][None, None])
        scores = run_tile(tile)[0]
        if activation == "softmax":
            softmax_xp_(scores, xp)
        scores *= norm.factor(start)
        parts = tile_to_target(plan, start)
        if parts is not None:
            tile_sl, vol_sl = parts
            target = out[(slice(None),) + vol_sl]
            target += scores[(slice(None),) + tile_sl]
        del scores, tile
        if on_tile is not None:
            on_tile()
        if progress is not None:
            progress(1)
    return plan


def tile_runner(engine: Any, xp: ModuleType) -> TileRunner:
    """How to run one tile of ``xp`` arrays on ``engine``: ``engine.run`` for numpy; ``engine.run_cupy`` (IO
    binding, no host copy) for CuPy when the engine has it, else a host round trip through ``engine.run``."""
    if xp is np:
        return engine.run  # type: ignore[no-any-return]
    run_cupy = getattr(engine, "run_cupy", None)
    if callable(run_cupy):
        return run_cupy  # type: ignore[no-any-return]
    return lambda tile: xp.asarray(engine.run(to_host(tile)))


def infer_ensemble_xp(volume: Array, engines: Sequence[Any], roi: Sequence[int], xp: ModuleType = np, *,
                      overlap: float = 0.0, blend: str = "constant", spacing_z: float = 1.0, z_crop: bool = True,
                      acc_dtype: Any = None, progress: Progress | None = None,
                      on_tile: Callable[[], None] | None = None) -> EnsembleResult:
    """Device twin of :func:`flare.runtime.ensemble.infer_ensemble`: the folds' softmax averaged in one in-place
    accumulator on the device of ``xp`` (``acc_dtype``: fp16 by default; float32 reproduces the host exactly),
    fold 0 over the whole volume and folds 1..N-1 on the abdominal z-range, one argmax, uint8 labels copied to the
    host once. ``volume`` is (X, Y, Z) float32 on that device (see :func:`crop_resample_xp`)."""
    if not engines:
        raise ValueError("at least one fold engine is needed")
    acc = ProbAccumulator(engines[0].out_channels, volume.shape, xp, acc_dtype)
    kw = {"overlap": overlap, "blend": blend, "progress": progress, "on_tile": on_tile}
    plan = sliding_window_xp(volume, tile_runner(engines[0], xp), roi, acc.data, xp, **kw)  # type: ignore[arg-type]
    tiles = [plan.n_tiles]
    z_range = None
    if len(engines) > 1 and z_crop:
        z_range = abdominal_z_range(to_host(acc.argmax()), spacing_z)
    z0, z1 = z_range if z_range is not None else (0, volume.shape[2])
    sub_vol, sub_acc = volume[:, :, z0:z1], acc.view_z(z0, z1)
    for engine in engines[1:]:
        p = sliding_window_xp(sub_vol, tile_runner(engine, xp), roi, sub_acc, xp, **kw)  # type: ignore[arg-type]
        tiles.append(p.n_tiles)
    labels = to_host(acc.argmax())
    del acc
    return EnsembleResult(labels, sum(tiles), plan.roi, z_range, len(engines), tiles)


def infer_with_budget(volume: Array, engines: Sequence[Any], bundle_roi: Sequence[int], xp: ModuleType = np, *,
                      budget_mb: float = 4000.0, overlap: float = 0.0, blend: str = "constant",
                      spacing_z: float = 1.0, progress: Progress | None = None,
                      on_cpu: Callable[[], EnsembleResult] | None = None) -> tuple[EnsembleResult, dict[str, Any]]:
    """The infer stage on a device with a memory budget: tiles from :func:`flare.runtime.budget.candidate_rois`
    for the engines' ``(backend, precision)`` (the bundle's roi when there is no memory model for them, e.g. on the
    CPU), :func:`infer_ensemble_xp` retried with smaller tiles on out-of-memory errors, then ``on_cpu()``.
    Returns the result and a report part: ``{"budget_mb", "rois_tried", "fallback", "gpu_peak_mb"}``."""
    from .budget import MEMORY_MODELS, candidate_rois, run_with_fallback

    key = (engines[0].backend, engines[0].precision)
    channels = engines[0].out_channels
    rois = (candidate_rois(budget_mb, volume.shape, *key, overlap=overlap, blend=blend, channels=channels)
            if key in MEMORY_MODELS and xp is not np else [tuple(int(r) for r in bundle_roi)])
    peak = DeviceMemoryPeak()
    record: list[str] = []
    tried: list[list[int]] = []

    def attempt(roi: tuple[int, int, int]) -> EnsembleResult:
        tried.append(list(roi))
        return infer_ensemble_xp(volume, engines, roi, xp, overlap=overlap, blend=blend, spacing_z=spacing_z,
                                 progress=progress, on_tile=peak.sample)

    result = run_with_fallback(attempt, rois, on_cpu, record=record)  # type: ignore[arg-type]
    return result, {"budget_mb": budget_mb, "rois_tried": tried, "fallback": record,
                    "gpu_peak_mb": None if peak.peak_mb is None else round(peak.peak_mb, 1)}


# -- device memory ---------------------------------------------------------------------------------------------------
def device_memory_used_mb(device_id: int = 0) -> float | None:
    """Used device memory (total − free, context and every process included: the FLARE way), MB; None without
    CuPy/CUDA."""
    if not cupy_available():
        return None
    import cupy

    with cupy.cuda.Device(device_id):
        free, total = cupy.cuda.runtime.memGetInfo()
    return (total - free) / 1e6


class DeviceMemoryPeak:
    """Peak of :func:`device_memory_used_mb` over the samples taken (call :meth:`sample` after each tile — ONNX
    Runtime's arena does not shrink, so per-tile samples catch its peak)."""

    def __init__(self, device_id: int = 0) -> None:
        self.device_id = device_id
        self.peak_mb: float | None = None
        self.sample()

    def sample(self) -> None:
        used = device_memory_used_mb(self.device_id)
        if used is not None:
            self.peak_mb = used if self.peak_mb is None else max(self.peak_mb, used)


def volume_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (budget bookkeeping)."""
    return int(math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize)
