"""Tiled inference and the fold ensemble.

Every fold's per-tile softmax is blended (constant or Gaussian weights, normalised by the summed weights of its
own tile plan) and added **in place** into one float32 accumulator ``(C, X, Y, Z)``; no per-fold probability volume
is ever held. The paper's z-crop: fold 0 runs on the whole volume; when it finds no tumor outside the z-range of
the abdominal organs, folds 1..N-1 run only on that range. The argmax is taken once, straight to uint8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .engines import Engine
from .labels import MERGED_TUMOR
from .tiling import TilePlan, effective_roi, importance_map, plan_tiles

__all__ = [
    "EnsembleResult",
    "abdominal_z_range",
    "infer_ensemble",
    "sliding_window",
    "softmax_",
    "tile_to_target",
]

Progress = Callable[[int], None]  # called with the number of tiles just finished
#: merged classes that define the abdominal z-range (the organs; not tumor)
_ORGAN_CLASSES = (1, 11)
Z_MARGIN_MM = 10.0


def softmax_(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax over ``axis``, computed in place in ``logits`` (float32) and returned."""
    logits -= logits.max(axis=axis, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=axis, keepdims=True)
    return logits


def _weight_sum(plan: TilePlan, weight: np.ndarray) -> np.ndarray:
    total = np.zeros(plan.padded_shape, dtype=np.float32)
    for start in plan.starts:
        total[plan.slices(start)] += weight
    return total


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


def sliding_window(volume: np.ndarray, engine: Engine, roi: tuple[int, int, int], out: np.ndarray, *,
                   overlap: float = 0.0, blend: str = "constant", activation: str = "softmax",
                   progress: Progress | None = None, divisor: int = 16) -> TilePlan:
    """Run ``engine`` over ``volume`` (X, Y, Z, float32) in tiles and **add** the blended, plan-normalised
    per-tile outputs (softmax or raw logits) to ``out`` (C, X, Y, Z). Returns the plan used."""
    eff = effective_roi(volume.shape, roi, divisor)
    plan = plan_tiles(volume.shape, eff, overlap)
    weight = importance_map(plan.roi, blend)
    wsum = _weight_sum(plan, weight)
    padded = plan.pad(volume)
    for start in plan.starts:
        sl = plan.slices(start)
        tile = padded[sl][None, None]
        scores = engine.run(tile)[0]
        if activation == "softmax":
            softmax_(scores)
        scores *= weight / wsum[sl]
        parts = tile_to_target(plan, start)
        if parts is not None:
            tile_sl, vol_sl = parts
            out[(slice(None),) + vol_sl] += scores[(slice(None),) + tile_sl]
        if progress is not None:
            progress(1)
    return plan


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
    labels: np.ndarray                    # uint8 merged classes (X, Y, Z)
    tiles: int
    roi: tuple[int, int, int]
    z_range: tuple[int, int] | None       # the folds 1..N-1 range (None: whole volume)
    folds: int
    per_fold_tiles: list[int] = field(default_factory=list)


def infer_ensemble(volume: np.ndarray, engines: Sequence[Engine], roi: tuple[int, int, int], *,
                   overlap: float = 0.0, blend: str = "constant", spacing_z: float = 1.0, z_crop: bool = True,
                   progress: Progress | None = None) -> EnsembleResult:
    """Average the folds' softmax over ``volume`` (X, Y, Z normalised float32) and return uint8 merged labels."""
    if not engines:
        raise ValueError("at least one fold engine is needed")
    channels = engines[0].out_channels
    acc = np.zeros((channels,) + volume.shape, dtype=np.float32)
    plan = sliding_window(volume, engines[0], roi, acc, overlap=overlap, blend=blend, progress=progress)
    tiles = [plan.n_tiles]
    z_range = None
    if len(engines) > 1 and z_crop:
        z_range = abdominal_z_range(acc.argmax(axis=0).astype(np.uint8), spacing_z)
    z0, z1 = z_range if z_range is not None else (0, volume.shape[2])
    sub_vol, sub_acc = volume[:, :, z0:z1], acc[:, :, :, z0:z1]
    for engine in engines[1:]:
        p = sliding_window(sub_vol, engine, roi, sub_acc, overlap=overlap, blend=blend, progress=progress)
        tiles.append(p.n_tiles)
    labels = acc.argmax(axis=0).astype(np.uint8)
    return EnsembleResult(labels, sum(tiles), plan.roi, z_range, len(engines), tiles)


def planned_tiles(shape: tuple[int, int, int], roi: tuple[int, int, int], overlap: float) -> int:
    """Number of tiles one fold needs for ``shape`` (for progress totals)."""
    return plan_tiles(shape, effective_roi(shape, roi), overlap).n_tiles
