"""GPU memory budget: pick the tile size from a per-voxel memory model, and survive out-of-memory errors.

Memory model
------------
Peak device memory (the FLARE way of counting: the device's used memory, CUDA context included) is modelled as::

    peak = fixed + bytes_per_voxel * tile_voxels            # the engine: context, weights, workspace, activations
         + io_bytes_per_voxel * tile_voxels                 # our own per-tile buffers (input, logits, the sum)
         + resident_bytes_per_voxel * crop_voxels           # the fp32 input volume on the device (4 B/voxel)

With the tile-major ensemble (:mod:`flare.runtime.inference.ensemble`) nothing else is volume-sized on the device: labels
go to a host uint8 volume tile by tile, overlap partial sums live in host memory slab by slab (the grouped design
keeps a host accumulator). ``fixed`` and ``bytes_per_voxel`` come from :data:`MEMORY_MODELS`, one row per (backend, precision); the
ONNX Runtime CUDA fp16 row is a least-squares fit of a fresh-process tile-size sweep (H100, onnxruntime-gpu
1.31.1, 96³…224³: 1.83/2.50/3.60/5.24/7.54 GB) — 551 B/voxel + 1342 MB, residuals under 4 MB. The other rows, the
per-tile io term and the CUDA context (:data:`CONTEXT_MB`) are **estimates**, and so is the whole model for the
tile-major order: none of it has been measured on a GPU since the redesign. ``benchmarks/gpu_check.sh`` measures
each tile size in a fresh process and the NVML peak at budgets 2000 and 4000 MB; replace the constants with its
numbers. "MB" is 10^6 bytes throughout (the anchors' GB are 10^9 bytes).

The budget caps ONNX Runtime's arena too: :func:`arena_limit_mb` is the ``gpu_mem_limit`` the CUDA engines get
(the budget minus the context and our own buffers for the worst-case crop), and :func:`choose_roi` only picks
tiles whose engine part fits that arena — an arena that cannot grow raises a real out-of-memory error instead of
silently exceeding the budget.

Tile choice
-----------
:func:`choose_roi` enumerates tiles with sides divisible by 16 (capped by the crop, rounded up to 16, and by
``max_roi``) and cube-ish (aspect at most 1.5, so that tile borders stay few: a thin slab would fit the same
memory but put most voxels near a zero-padded border), keeps those whose modelled peak fits the budget, and takes
the one with the least modelled time ``n_tiles * (7.84 ns * tile_voxels + 2.31 ms)`` (the same sweep's fit: small
tiles pay a per-tile overhead, tiles that overhang the crop pay for the padding). When the whole crop fits it is
one tile: no seams.

Out-of-memory fallback
----------------------
:func:`run_with_fallback` calls ``attempt(roi)`` for each roi in turn; an out-of-memory error (see
:func:`is_out_of_memory` for exactly what is matched) moves to the next, smaller roi; when every roi failed,
``on_cpu()`` runs, with a warning. Any other error propagates unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("flare.runtime")

__all__ = [
    "CONTEXT_MB",
    "MEMORY_MODELS",
    "WORST_CROP",
    "MemoryModel",
    "arena_limit_mb",
    "candidate_rois",
    "choose_roi",
    "engine_peak_mb",
    "estimate_peak_mb",
    "is_out_of_memory",
    "memory_model",
    "run_with_fallback",
    "tile_time_ms",
]

T = TypeVar("T")
Roi = tuple[int, int, int]

MB = 1e6
#: ONNX Runtime CUDA fp16 time per tile (least-squares fit of the anchors' sweep): ns per voxel and ms per tile
TIME_NS_PER_VOXEL = 7.84
TIME_MS_PER_TILE = 2.31


@dataclass(frozen=True)
class MemoryModel:
    """Device memory of one engine kind: ``fixed_mb + bytes_per_voxel * tile voxels``."""

    bytes_per_voxel: float
    fixed_mb: float
    source: str


MEMORY_MODELS: dict[tuple[str, str], MemoryModel] = {
    ("onnxruntime-cuda", "fp16"): MemoryModel(
        551.2, 1342.0, "fit of the ORT CUDA fp16 96³-224³ sweep, H100, onnxruntime-gpu 1.31.1 (measured)"),
    ("onnxruntime-cuda", "fp32"): MemoryModel(
        1100.0, 1520.0, "one point, 224³ fp32 = 13.9 GB, with the fp16 constant + fp32 weights (derived)"),
}


def memory_model(backend: str, precision: str) -> MemoryModel:
    """The model for ``(backend, precision)``; raises ``ValueError`` naming the known keys otherwise."""
    try:
        return MEMORY_MODELS[(backend, precision)]
    except KeyError:
        known = ", ".join(f"{b}/{p}" for b, p in MEMORY_MODELS)
        raise ValueError(f"no memory model for {backend}/{precision} (known: {known})") from None


#: CUDA context + cuDNN/cuBLAS handles, outside ONNX Runtime's arena (estimate: the anchors' "~0.5 GB context")
CONTEXT_MB = 500.0
#: the largest crop the runtime is sized for (the issue's worst case: a 512x512x300 CT kept whole, at 1 mm)
WORST_CROP = (384, 384, 375)


def io_bytes_per_voxel(channels: int) -> float:
    """Our own per-tile device buffers (estimate): fp32 input + its fp16 copy (6 B), the engine's fp16 logits and
    their fp32 copy (6·C), the tile sum (4·C) and the parked fold-0 probabilities uploaded for it (fp16 + fp32,
    6·C)."""
    return 6.0 + 16.0 * channels


def resident_bytes_per_voxel() -> float:
    """Device-resident arrays per crop voxel: the fp32 input volume (4). Nothing else is volume-sized on the device
    in the tile-major order."""
    return 4.0


def engine_peak_mb(roi: Sequence[int], backend: str, precision: str) -> float:
    """Modelled memory of the engine alone (context included) for tiles of ``roi``, MB."""
    model = memory_model(backend, precision)
    return model.fixed_mb + model.bytes_per_voxel * math.prod(int(r) for r in roi) / MB


def xp_peak_mb(roi: Sequence[int], crop_shape: Sequence[int], channels: int = 13, resident: bool = True) -> float:
    """Modelled memory of our own device arrays for tiles of ``roi`` over ``crop_shape``, MB."""
    tile = math.prod(int(r) for r in roi)
    crop = math.prod(int(s) for s in crop_shape) if resident else 0
    return (tile * io_bytes_per_voxel(channels) + crop * resident_bytes_per_voxel()) / MB


def estimate_peak_mb(roi: Sequence[int], crop_shape: Sequence[int], backend: str, precision: str, *,
                     channels: int = 13, resident: bool = True) -> float:
    """Modelled device peak (MB) of tiled inference with ``roi`` over a crop of ``crop_shape``."""
    return engine_peak_mb(roi, backend, precision) + xp_peak_mb(roi, crop_shape, channels, resident)


def arena_limit_mb(budget_mb: float, backend: str, precision: str, *, channels: int = 13,
                   crop_shape: Sequence[int] = WORST_CROP) -> float:
    """``gpu_mem_limit`` for ONNX Runtime's arena under ``budget_mb``: the budget minus the CUDA context and our
    own buffers at the tile :func:`choose_roi` picks for the worst-case crop (at least a quarter of the budget)."""
    roi = choose_roi(budget_mb, crop_shape, backend, precision, channels=channels)
    return max(budget_mb - CONTEXT_MB - xp_peak_mb(roi, crop_shape, channels), budget_mb / 4)


def _axis_tiles(size: int, roi: int, overlap: float) -> int:
    """Tiles along one axis, as :func:`flare.runtime.inference.tiling.plan_tiles` counts them (padding when roi > size)."""
    interval = max(1, int(roi * (1.0 - overlap)))
    return math.ceil(max(size - roi, 0) / interval) + 1


def tile_time_ms(roi: Sequence[int], crop_shape: Sequence[int], overlap: float = 0.0) -> float:
    """Modelled inference time of one fold: ``n_tiles * (ns/voxel * tile_voxels + ms/tile)``."""
    n = math.prod(_axis_tiles(int(s), int(r), overlap) for s, r in zip(crop_shape, roi))
    return n * (TIME_NS_PER_VOXEL * 1e-6 * math.prod(int(r) for r in roi) + TIME_MS_PER_TILE)


def _side_options(size: int, cap: int, divisor: int, min_side: int) -> list[int]:
    top = min(int(math.ceil(size / divisor) * divisor), cap)
    low = min(min_side, top)
    return list(range(low, top + 1, divisor)) or [top]


def _cube_ish(roi: Sequence[int], tops: Sequence[int], max_aspect: float) -> bool:
    """Every side at least ``max(roi) / max_aspect``, unless the crop itself is thinner along that axis."""
    longest = max(roi)
    return all(r * max_aspect >= longest or r == t for r, t in zip(roi, tops))


def choose_roi(budget_mb: float, crop_shape: Sequence[int], backend: str, precision: str, *, divisor: int = 16,
               max_roi: Sequence[int] | None = None, min_side: int = 32, channels: int = 13, overlap: float = 0.0,
               resident: bool = True, max_aspect: float = 1.5, arena_mb: float | None = None) -> Roi:
    """The cube-ish tile (sides divisible by ``divisor``, aspect at most ``max_aspect`` unless the crop is thinner)
    with the least modelled time whose modelled peak fits ``budget_mb`` (and whose engine part fits ``arena_mb``,
    the arena cap, when given); ties go to the larger smallest side. The
    whole crop (rounded up to ``divisor``) when it fits: no seams. When nothing fits, the smallest tile
    (``min_side``³, capped by the crop) — the out-of-memory fallback then decides."""
    if budget_mb <= 0:
        raise ValueError(f"memory budget must be positive, got {budget_mb} MB")
    caps = tuple(int(c) for c in (max_roi or (1 << 30,) * 3))
    options = [_side_options(int(s), c, divisor, min_side) for s, c in zip(crop_shape, caps)]
    tops = [o[-1] for o in options]
    best: tuple[float, int] | None = None
    best_roi: Roi = tuple(o[0] for o in options)  # type: ignore[assignment]
    for roi in itertools.product(*options):
        if not _cube_ish(roi, tops, max_aspect):
            continue
        peak = estimate_peak_mb(roi, crop_shape, backend, precision, channels=channels, resident=resident)
        if peak > budget_mb:
            continue
        if arena_mb is not None and engine_peak_mb(roi, backend, precision) - CONTEXT_MB > arena_mb:
            continue
        key = (round(tile_time_ms(roi, crop_shape, overlap), 6), -min(roi))
        if best is None or key < best:
            best, best_roi = key, roi  # type: ignore[assignment]
    return best_roi


def candidate_rois(budget_mb: float, crop_shape: Sequence[int], backend: str, precision: str, *,
                   shrink: Sequence[float] = (1.0, 0.7, 0.5, 0.35), arena_mb: float | None = None,
                   **kwargs: object) -> list[Roi]:
    """Rois to try in order: the best under the budget (within the engines' arena cap ``arena_mb``: what the
    sessions were created with; by default :func:`arena_limit_mb` for this budget), then under shrinking fractions
    of it (distinct, strictly fewer voxels each time) — the retry list for :func:`run_with_fallback`."""
    out: list[Roi] = []
    arena = arena_mb if arena_mb is not None else arena_limit_mb(
        budget_mb, backend, precision, channels=int(kwargs.get("channels", 13)))  # type: ignore[call-overload]
    for f in shrink:
        roi = choose_roi(budget_mb * f, crop_shape, backend, precision, arena_mb=arena, **kwargs)  # type: ignore[arg-type]
        if not out or math.prod(roi) < math.prod(out[-1]):
            out.append(roi)
    return out


# -- out-of-memory detection and fallback ----------------------------------------------------------------------
#: substrings of ONNX Runtime error messages that mean "out of device/arena memory":
#: BFC arena limit hit ("Available memory of N is smaller than requested bytes of M"), a failed cudaMalloc
#: ("Failed to allocate memory for requested buffer of size", "CUDA failure 2: out of memory",
#: "cudaErrorMemoryAllocation"), cuDNN/cuBLAS workspace failures (…_STATUS_ALLOC_FAILED), TensorRT's allocator.
ORT_OOM_PATTERNS = (
    "failed to allocate memory", "is smaller than requested bytes", "out of memory", "cudaerrormemoryallocation",
    "cudnn_status_alloc_failed", "cublas_status_alloc_failed", "cudnn_status_not_enough_workspace",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the out-of-memory errors this runtime can recover from:

    - ``MemoryError`` (numpy and Python host allocations);
    - any exception class named ``OutOfMemoryError`` from CuPy (``cupy.cuda.memory.OutOfMemoryError``) or PyTorch
      (``torch.cuda.OutOfMemoryError``), matched by class name and module, so that neither is imported here;
    - ONNX Runtime errors (classes from ``onnxruntime.*``, e.g. ``Fail``, ``RuntimeException``) and TensorRT /
      :class:`flare.runtime.inference.engines.EngineError` messages containing one of :data:`ORT_OOM_PATTERNS`
      (case-insensitive).
    """
    if isinstance(exc, MemoryError):
        return True
    module = type(exc).__module__ or ""
    root = module.split(".")[0]
    if type(exc).__name__ == "OutOfMemoryError" and root in ("cupy", "cupy_backends", "torch"):
        return True
    if root in ("onnxruntime", "flare") or isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(p in text for p in ORT_OOM_PATTERNS)
    return False


def release_device_memory() -> None:
    """Return CuPy's cached blocks to the driver after an out-of-memory error (no-op without CuPy loaded)."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            cupy.get_default_memory_pool().free_all_blocks()
        except Exception as exc:  # noqa: BLE001 - best effort on a broken device
            log.debug("could not free CuPy's memory pool: %s", exc)


def run_with_fallback(attempt: Callable[[Roi], T], rois: Sequence[Roi], on_cpu: Callable[[], T] | None, *,
                      record: list[str] | None = None, engines: Sequence[object] = ()) -> T:
    """``attempt(roi)`` for each roi until one succeeds; an out-of-memory error (:func:`is_out_of_memory`) moves to
    the next roi, any other error propagates. When all fail, ``on_cpu()`` runs with a warning (or, without
    ``on_cpu``, the last out-of-memory error is raised). ``record`` collects one line per failed attempt for the
    report. After an out-of-memory error CuPy's cached blocks are freed and each of ``engines`` that can shrinks
    its arena (``shrink_arena``)."""
    last: BaseException | None = None
    for roi in rois:
        try:
            return attempt(roi)
        except Exception as exc:  # filtered just below: only out-of-memory errors are retried
            if not is_out_of_memory(exc):
                raise
            last = exc
            line = f"roi {'x'.join(map(str, roi))}: out of memory ({str(exc).splitlines()[0][:160] or type(exc).__name__})"
            log.warning("%s; retrying with a smaller tile", line)
            if record is not None:
                record.append(line)
            release_device_memory()
            for engine in engines:
                shrink = getattr(engine, "shrink_arena", None)
                if callable(shrink):
                    shrink()
    if on_cpu is None:
        assert last is not None, "run_with_fallback needs at least one roi or on_cpu"
        raise last
    log.warning("GPU out of memory with every tile size tried; falling back to the CPU")
    if record is not None:
        record.append("fell back to cpu")
    return on_cpu()
