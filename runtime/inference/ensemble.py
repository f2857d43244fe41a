"""Tiled inference and the fold ensemble — one implementation; the device is a parameter (``xp`` = numpy or CuPy).

Tile-major order (:func:`tiled_labels`): for each tile, every model runs on it, their blended softmax is summed
in a tile-sized buffer on the device, and the voxels no later tile covers are decided there (argmax → uint8) and
copied to a host uint8 label volume. Nothing volume-sized lives on the device except the input volume itself.
Voxels that a later tile also covers (the MONAI tile scheme shifts the last tile of an axis back to end at the
volume's edge, and overlap > 0 covers everything several times) have their partial sum written to a host float
accumulator (``base``) that the later tile reads back before adding its own scores — so every voxel gets the sum
over all tiles and models covering it, exactly as the classic fold-major accumulation does.

The paper's z-crop (:func:`infer_ensemble`): pass 1 runs fold 0 alone over the whole volume and parks its blended
probabilities in host memory (``base``: float16 with CuPy, float32 with numpy) — fold 0's labels decide the abdominal z-range;
pass 2 runs folds 1..N-1 tile-major on that range only, starting from the parked fold-0 probabilities. Parking
rather than recomputing: fold 0 on pass-2 tiles would be one more model run per tile (on the CPU that is a whole
extra fold on the z-range — the largest cost of all), and recomputing on the pass-2 tile grid would change fold
0's tile positions, so the labels would no longer equal the classic result. With ``xp=numpy`` the parked
probabilities are the accumulator itself (no copy), and the labels are identical to the classic fold-major
ensemble wherever a voxel is covered by one tile per fold (the summation order differs only inside the overlap of
shifted edge tiles, by float32 rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from flare.runtime.foundation.labels import MERGED_TUMOR
from flare.runtime.inference.device import Array, host_empty, to_device, to_host
from flare.runtime.inference.tiling import TilePlan, effective_roi, importance_map, plan_tiles

__all__ = [
    "EnsembleResult",
    "abdominal_z_range",
    "argmax_uint8",
    "foreground_uint8",
    "infer_ensemble",
    "infer_with_budget",
    "planned_tiles",
    "softmax_",
    "tile_runner",
    "tile_to_target",
    "tiled_labels",
]

Progress = Callable[[int], None]  # called with the number of (tile, model) runs just finished
TileRunner = Callable[[Array], Array]
Decide = Callable[[Array, ModuleType], Array]
#: merged classes that define the abdominal z-range (the organs; not tumor)
_ORGAN_CLASSES = (1, 11)
Z_MARGIN_MM = 10.0


def softmax_(logits: Array, xp: ModuleType = np, axis: int = 0) -> Array:
    """Softmax over ``axis``, computed in place in ``logits`` (float32) and returned."""
    logits -= logits.max(axis=axis, keepdims=True)
    xp.exp(logits, out=logits)
    logits /= logits.sum(axis=axis, keepdims=True)
    return logits


def argmax_uint8(scores: Array, xp: ModuleType = np) -> Array:
    """Class index of the largest score ``(C, ...)`` → uint8, on the device of ``scores``."""
    return scores.argmax(axis=0).astype(xp.uint8)


def foreground_uint8(scores: Array, xp: ModuleType = np) -> Array:
    """The locator's organ mask as uint8: logit > 0 for one channel, argmax > 0 for several."""
    mask = scores[0] > 0 if scores.shape[0] == 1 else scores.argmax(axis=0) > 0
    return mask.astype(xp.uint8)


def tile_to_target(plan: TilePlan, start: tuple[int, int, int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices into the tile, slices into the unpadded volume) of the part of a tile inside the volume."""
    tile_sl, vol_sl = [], []
    for s, r, b, n in zip(start, plan.roi, plan.pad_before, plan.shape):
        lo, hi = max(s, b), min(s + r, b + n)
        if hi <= lo:
            return None
        tile_sl.append(slice(lo - s, hi - s))
        vol_sl.append(slice(lo - b, hi - b))
    return tuple(tile_sl), tuple(vol_sl)


def _final_ends(plan: TilePlan) -> list[dict[int, int]]:
    """Per axis, tile start → end (padded coordinates, exclusive) of the part no later tile covers: the next start
    along that axis, or the tile's end for the last one. In the plan's (lexicographic) tile order a voxel is final
    in tile ``t`` exactly when ``t`` has the largest covering start on every axis."""
    ends = []
    for axis in range(3):
        starts = sorted({s[axis] for s in plan.starts})
        r = plan.roi[axis]
        ends.append({s: min(s + r, nxt) for s, nxt in zip(starts, starts[1:] + [starts[-1] + r])})
    return ends


def _fresh_tiles(plan: TilePlan) -> set[tuple[int, int, int]]:
    """Tiles that no earlier tile overlaps (on every axis the previous start's tile ends at or before this start):
    they need no earlier partial sums."""
    prev_end = []
    for axis in range(3):
        starts = sorted({s[axis] for s in plan.starts})
        r = plan.roi[axis]
        prev_end.append({s: (p + r if i else s) for i, (s, p) in enumerate(zip(starts, [0, *starts[:-1]]))})
    return {t for t in plan.starts if all(prev_end[a][t[a]] <= t[a] for a in range(3))}


class _Weights:
    """``weight / weight-sum`` of each tile of a plan. Constant blending: ``1 / (cx * cy * cz)`` from per-axis tile
    counts (no volume-sized array; the same float32 values as a summed weight map). Gaussian: the weight sum is
    built once on the host and each tile's factor uploaded."""

    def __init__(self, plan: TilePlan, blend: str, xp: ModuleType) -> None:
        self.plan, self.xp = plan, xp
        self.weight = importance_map(plan.roi, blend)
        self.wsum: np.ndarray | None = None
        if blend == "constant":
            counts = []
            for axis in range(3):
                c = np.zeros(plan.padded_shape[axis], dtype=np.float32)
                for s in sorted({start[axis] for start in plan.starts}):
                    c[s:s + plan.roi[axis]] += 1.0
                counts.append(c)
            self.counts = counts
            self._ones = plan.n_tiles == 1 or all(c.max() == 1.0 for c in counts)
        else:
            self.wsum = np.zeros(plan.padded_shape, dtype=np.float32)
            for start in plan.starts:
                self.wsum[plan.slices(start)] += self.weight

    def factor(self, start: tuple[int, int, int]) -> Array | None:
        """The tile's blending factor on the device (None: all ones, nothing to multiply)."""
        sl = self.plan.slices(start)
        if self.wsum is not None:
            return to_device(self.weight / self.wsum[sl], self.xp)
        cx, cy, cz = (c[s] for c, s in zip(self.counts, sl))
        if self._ones or (cx.max() == 1.0 and cy.max() == 1.0 and cz.max() == 1.0):
            return None
        return to_device(self.weight / (cx[:, None, None] * cy[None, :, None] * cz[None, None, :]), self.xp)


def tile_runner(engine: Any, xp: ModuleType) -> TileRunner:
    """How to run one tile of ``xp`` arrays on ``engine``: ``engine.run`` for numpy; ``engine.run_cupy`` (IO
    binding, no host copy) for CuPy when the engine has it, else a host round trip through ``engine.run``."""
    if xp is np:
        return engine.run  # type: ignore[no-any-return]
    run_cupy = getattr(engine, "run_cupy", None)
    if callable(run_cupy):
        return run_cupy  # type: ignore[no-any-return]
    return lambda tile: xp.asarray(engine.run(to_host(tile)))


def tiled_labels(volume: Array, runners: Sequence[TileRunner], roi: Sequence[int], xp: ModuleType = np, *,
                 channels: int, overlap: float = 0.0, blend: str = "constant", activation: str = "softmax",
                 decide: Decide = argmax_uint8, base: np.ndarray | None = None, keep_all: bool = False,
                 base_dtype: Any = np.float32, progress: Progress | None = None,
                 on_tile: Callable[[], None] | None = None, divisor: int = 16
                 ) -> tuple[np.ndarray, TilePlan, np.ndarray | None]:
    """Tile-major inference of ``runners`` over ``volume`` (X, Y, Z float32, on ``xp``'s device or the host).

    Per tile: every runner's output (softmax, or raw with ``activation="none"``), times the tile's blending factor,
    is summed on the device, on top of ``base``'s values for the tile (host float array ``(channels, X, Y, Z)`` of
    earlier contributions, or zeros); the voxels final in this tile are decided (``decide``, e.g. argmax → uint8)
    and copied into the host label volume; the rest of the sum goes back to ``base`` for the later tiles that cover
    it (``keep_all``: the whole sum goes back — ``base`` then holds the blended scores of these runners). ``base``
    is allocated on first need (``base_dtype``; pageable: a volume-sized page-locked allocation costs more than the
per-tile copies it would speed up — to be confirmed on a GPU). Returns ``(labels uint8 host, plan, base)``."""
    plan = plan_tiles(volume.shape, effective_roi(volume.shape, tuple(int(r) for r in roi), divisor), overlap)
    weights = _Weights(plan, blend, xp)
    ends = _final_ends(plan)
    labels = host_empty(plan.shape, np.uint8, xp, zero=True)
    fresh = _fresh_tiles(plan) if base is None else set()  # a caller's base always holds earlier contributions
    if keep_all and base is None:
        base = host_empty((channels,) + plan.shape, base_dtype, xp, zero=True, pinned=False)
    for start in plan.starts:
        parts = tile_to_target(plan, start)
        if parts is None:  # a tile wholly in the zero padding: nothing of it is kept
            if progress is not None:
                progress(len(runners))
            continue
        tile_sl, vol_sl = parts
        region = (slice(None),) + vol_sl
        # the tile is built from the part inside the volume; the rest stays zero (the plan's padding), so no padded
        # copy of the volume is ever made, on the host or the device
        tile = xp.zeros((1, 1) + tuple(plan.roi), dtype=xp.float32)
        tile[(0, 0) + tile_sl] = to_device(volume[vol_sl], xp)
        factor = weights.factor(start)
        in_place = base is not None and xp is np  # numpy: acc is a view of base, sums land there directly
        acc = None
        if in_place:
            acc = base[region]  # type: ignore[index]
        elif base is not None and start not in fresh:  # device: copy up only what earlier tiles left
            acc = to_device(base[region], xp).astype(xp.float32)
        for run in runners:
            scores = run(tile)[0]
            if activation == "softmax":
                softmax_(scores, xp)
            if factor is not None:
                scores *= factor
            scores = scores[(slice(None),) + tile_sl]
            if acc is None:
                acc = scores
            else:
                acc += scores
            if progress is not None:
                progress(1)
        del tile
        assert acc is not None, "tiled_labels needs at least one runner"
        final = tuple(slice(0, min(s + r, ends[a][s], b + n) - max(s, b))  # in acc's coordinates
                      for a, (s, r, b, n) in enumerate(zip(start, plan.roi, plan.pad_before, plan.shape)))
        if all(f.stop > 0 for f in final):
            dest = tuple(slice(v.start, v.start + f.stop) for v, f in zip(vol_sl, final))
            labels[dest] = to_host(decide(acc[(slice(None),) + final], xp))
        rest = keep_all or any(f.stop < v.stop - v.start for f, v in zip(final, vol_sl))
        if rest and not in_place:
            if base is None:
                base = host_empty((channels,) + plan.shape, base_dtype, xp, zero=True, pinned=False)
            base[region] = to_host(acc.astype(base.dtype, copy=False))  # cast on the device: fewer bytes to copy
        del acc
        if on_tile is not None:
            on_tile()
    return labels, plan, base


def abdominal_z_range(labels: np.ndarray, spacing_z: float, margin_mm: float = Z_MARGIN_MM) -> tuple[int, int] | None:
    """z-range [z0, z1) of merged organ classes, widened by ``margin_mm``; None when there is no organ or when
    tumor lies outside the range (then the other folds must see the whole volume)."""
    organ = (labels >= _ORGAN_CLASSES[0]) & (labels <= _ORGAN_CLASSES[1])
    zs = np.flatnonzero(organ.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    margin = int(np.ceil(margin_mm / spacing_z))
    z0, z1 = max(0, int(zs[0]) - margin), min(labels.shape[2], int(zs[-1]) + 1 + margin)
    tumor_z = np.flatnonzero((labels == MERGED_TUMOR).any(axis=(0, 1)))
    if tumor_z.size and (tumor_z[0] < z0 or tumor_z[-1] >= z1):
        return None
    return z0, z1


@dataclass
class EnsembleResult:
    labels: np.ndarray                    # uint8 merged classes (X, Y, Z), host
    tiles: int
    roi: tuple[int, int, int]
    z_range: tuple[int, int] | None       # the folds 1..N-1 range (None: whole volume)
    folds: int
    per_fold_tiles: list[int] = field(default_factory=list)


def infer_ensemble(volume: Array, engines: Sequence[Any], roi: Sequence[int], xp: ModuleType = np, *,
                   overlap: float = 0.0, blend: str = "constant", spacing_z: float = 1.0, z_crop: bool = True,
                   park_dtype: Any = None, progress: Progress | None = None,
                   on_tile: Callable[[], None] | None = None) -> EnsembleResult:
    """The fold ensemble over ``volume`` (X, Y, Z normalised float32 on ``xp``'s device or the host): uint8 merged
    labels on the host. With several folds and ``z_crop``: fold 0 first (its probabilities parked on the host in
    ``park_dtype``: float32 with numpy, float16 with CuPy by default), folds 1..N-1 tile-major on the abdominal
    z-range; otherwise every fold tile-major in one pass."""
    if not engines:
        raise ValueError("at least one fold engine is needed")
    runners = [tile_runner(e, xp) for e in engines]
    kw: dict[str, Any] = {"channels": engines[0].out_channels, "overlap": overlap, "blend": blend,
                          "progress": progress, "on_tile": on_tile}
    n = len(engines)
    if n == 1 or not z_crop:  # float32 partial sums: only the pages of overlapping slabs are ever touched
        labels, plan, _ = tiled_labels(volume, runners, roi, xp, **kw)
        return EnsembleResult(labels, plan.n_tiles * n, plan.roi, None, n, [plan.n_tiles] * n)
    park = park_dtype or (np.float32 if xp is np else np.float16)
    labels, plan, parked = tiled_labels(volume, runners[:1], roi, xp, keep_all=True, base_dtype=park, **kw)
    z_range = abdominal_z_range(labels, spacing_z)
    z0, z1 = z_range if z_range is not None else (0, volume.shape[2])
    assert parked is not None
    sub, sub_plan, _ = tiled_labels(volume[:, :, z0:z1], runners[1:], roi, xp, base=parked[:, :, :, z0:z1], **kw)
    del parked
    labels[:, :, z0:z1] = sub
    tiles = [plan.n_tiles] + [sub_plan.n_tiles] * (n - 1)
    return EnsembleResult(labels, sum(tiles), plan.roi, z_range, n, tiles)


def planned_tiles(shape: tuple[int, int, int], roi: tuple[int, int, int], overlap: float) -> int:
    """Number of tiles one fold needs for ``shape`` (for progress totals)."""
    return plan_tiles(shape, effective_roi(shape, roi), overlap).n_tiles


def infer_with_budget(volume: Array, engines: Sequence[Any], bundle_roi: Sequence[int], xp: ModuleType = np, *,
                      budget_mb: float | None = None, overlap: float = 0.0, blend: str = "constant",
                      spacing_z: float = 1.0, progress: Progress | None = None,
                      on_tile: Callable[[], None] | None = None,
                      on_cpu: Callable[[], EnsembleResult] | None = None, arena_mb: float | None = None
                      ) -> tuple[EnsembleResult, dict[str, Any]]:
    """:func:`infer_ensemble` under a device memory budget: tiles from :func:`flare.runtime.inference.budget.candidate_rois`
    for the engines' ``(backend, precision)`` (the bundle's roi when there is no memory model for them — the CPU),
    retried with smaller tiles on out-of-memory errors, then ``on_cpu()``. Returns the result and a report part:
    ``{"budget_mb", "rois_tried", "fallback", "gpu_peak_mb"}``."""
    from flare.runtime.inference.budget import MEMORY_MODELS, candidate_rois, run_with_fallback
    from flare.runtime.inference.device import DeviceMemoryPeak

    key = (engines[0].backend, engines[0].precision)
    rois: list[tuple[int, ...]] = [tuple(int(r) for r in bundle_roi)]
    if budget_mb is not None and key in MEMORY_MODELS:
        rois = list(candidate_rois(budget_mb, volume.shape, *key, overlap=overlap, channels=engines[0].out_channels,
                                   arena_mb=arena_mb))
    peak = DeviceMemoryPeak(getattr(engines[0], "device_id", 0)) if key in MEMORY_MODELS else None
    fallback: list[str] = []
    tried: list[list[int]] = []

    def sample() -> None:
        if peak is not None:
            peak.sample()
        if on_tile is not None:
            on_tile()

    def attempt(roi: tuple[int, int, int]) -> EnsembleResult:
        tried.append(list(roi))
        return infer_ensemble(volume, engines, roi, xp, overlap=overlap, blend=blend, spacing_z=spacing_z,
                              progress=progress, on_tile=sample)

    result = run_with_fallback(attempt, rois, on_cpu, record=fallback)  # type: ignore[arg-type]
    gpu_peak = None if peak is None or peak.peak_mb is None else round(peak.peak_mb, 1)
    return result, {"budget_mb": budget_mb, "rois_tried": tried, "fallback": fallback, "gpu_peak_mb": gpu_peak}
