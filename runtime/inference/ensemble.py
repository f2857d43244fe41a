"""Tiled inference and the fold ensemble — one implementation; the device is a parameter (``xp`` = numpy or CuPy).

Tile-major order (:func:`tiled_labels`): for each tile, every model runs on it, their blended softmax is summed
in a tile-sized buffer on the device, and the voxels no later tile covers are decided there (argmax → uint8) and
copied to a host uint8 label volume. Nothing volume-sized lives on the device except the input volume itself.
Voxels that a later tile also covers (the MONAI tile scheme shifts the last tile of an axis back to end at the
volume's edge, and overlap > 0 covers everything several times) have their partial sum written to a host float
accumulator (``base``) that the later tile reads back before adding its own scores — so every voxel gets the sum
over all tiles and models covering it, exactly as the classic fold-major accumulation does.

The paper's z-crop (:func:`infer_ensemble`): pass 1 runs fold 0 alone over the whole volume — its labels decide
the abdominal z-range; pass 2 runs folds 1..N-1 tile-major on that range only, on top of fold 0's probabilities
there. On the host (numpy) pass 1 keeps fold 0's probabilities in a float32 accumulator (``base``: recomputing would
cost a whole extra fold on the CPU); on the device nothing volume-sized goes to the host: fold 0 is recomputed in
pass 2 on pass 1's own tiles inside the z-range (:class:`_Fold0OnPass1Grid`), so fold 0's tile positions — and the
labels — stay those of the classic fold-major ensemble (MONAI ``sliding_window_inference`` per fold), up to float32
summation order inside the overlap of shifted edge tiles.

On the device the overlap partial sums are kept slab by slab (:class:`_SlabStore`: host arrays freed once read for
the last time, next-tile-only slabs left on the device), and the device takes a census of the labels it decides
(:class:`_Census`: classes per tile, organ/tumor z slices) so the host never scans the label volume. The memory
plan's ``grouped`` design (fewer fold sessions than folds alive at a time) runs :func:`_grouped` instead:
fold-major across groups with a host accumulator, as the paper did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from flare.runtime.foundation.labels import MERGED_TUMOR
from flare.runtime.inference.device import Array, host_empty, is_device_array, to_device, to_host, to_host_into
from flare.runtime.inference.tiling import TilePlan, effective_roi, importance_map, max_tiles, plan_tiles

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
Prior = Callable[[TilePlan, tuple[int, int, int], tuple[slice, ...]], Array | None]
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


def _prev_ends(plan: TilePlan) -> list[dict[int, int]]:
    """Per axis, tile start → end (padded coordinates, exclusive) of the previous tile along that axis (the start
    itself for the first tile): the part ``[start, prev_end)`` of a tile is what earlier tiles also cover."""
    prev_end = []
    for axis in range(3):
        starts = sorted({s[axis] for s in plan.starts})
        r = plan.roi[axis]
        prev_end.append({s: (p + r if i else s) for i, (s, p) in enumerate(zip(starts, [0, *starts[:-1]]))})
    return prev_end


def _earlier_slabs(plan: TilePlan, prev_end: list[dict[int, int]], start: tuple[int, int, int],
                   vol_sl: tuple[slice, ...]) -> list[tuple[slice, ...]]:
    """The parts of a tile (in its in-volume coordinates) that earlier tiles cover — where they left partial sums:
    per axis where the previous tile ends inside this one, the slab before that end (full extent on the other
    axes; corners come twice, same values). The mirror of :func:`_later_slabs`."""
    sizes = [v.stop - v.start for v in vol_sl]
    slabs = []
    for axis, (s, b, n) in enumerate(zip(start, plan.pad_before, plan.shape)):
        stop = min(prev_end[axis][s], b + n) - max(s, b)
        if stop > 0:
            slabs.append(tuple(slice(0, min(stop, sizes[a])) if a == axis else slice(0, sizes[a]) for a in range(3)))
    return slabs


class _Weights:
    """``weight / weight-sum`` of each tile of a plan. Constant blending: ``1 / (cx * cy * cz)`` from per-axis tile
    counts, built on the device from three short vectors (no volume-sized array, no tile-sized host array; the
    same float32 values as a summed weight map). Gaussian: the weight sum is built once on the host and each tile's
    factor uploaded."""

    def __init__(self, plan: TilePlan, blend: str, xp: ModuleType) -> None:
        self.plan, self.xp = plan, xp
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
            self.weight = importance_map(plan.roi, blend)
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
        xp = self.xp
        count = to_device(cx, xp)[:, None, None] * to_device(cy, xp)[None, :, None]
        count = count * to_device(cz, xp)[None, None, :]
        return 1.0 / count  # type: ignore[no-any-return]


Region = tuple[tuple[int, int], ...]  # per axis (lo, hi) in volume coordinates


def _intersect(a: Region, b: Region) -> Region | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


class _SlabStore:
    """The overlap partial sums of the device path, slab by slab: each slab a host array of its own (page-locked
    with CuPy), kept only until the last tile that covers it has read it — host memory follows the overlaps in
    flight, not the volume. A slab that only the very next tile reads (the z-slab of a shifted last tile when no
    x/y overlap crosses it) stays on the device: no host round trip at all. A tile reads the slabs it intersects in
    the order they were written (a later slab holds the newer running sum where two overlap: corners), exactly
    what one volume-shaped accumulator gives."""

    def __init__(self, plan: TilePlan, xp: ModuleType) -> None:
        self.xp = xp
        self.boxes: list[Region | None] = []
        for start in plan.starts:
            parts = tile_to_target(plan, start)
            self.boxes.append(None if parts is None else tuple((v.start, v.stop) for v in parts[1]))
        self.items: list[tuple[Region, Array, int]] = []
        self.live_bytes = self.peak_bytes = 0

    def read(self, index: int, channels: int) -> Array | None:
        """The earlier partial sums over tile ``index`` on the device (None: no earlier tile covers it); slabs no
        later tile needs are freed."""
        box = self.boxes[index]
        assert box is not None
        acc = None
        for region, arr, _ in self.items:
            inter = _intersect(box, region)
            if inter is None:
                continue
            if acc is None:
                acc = self.xp.zeros((channels,) + tuple(hi - lo for lo, hi in box), self.xp.float32)
            dst = (slice(None),) + tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, box))
            src = (slice(None),) + tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(inter, region))
            piece = arr[src]  # a sub-block of a host slab is strided: upload the whole slab and cut it on the
            # device (a larger copy for the copy engine) rather than gather it on the host
            acc[dst] = (to_device(piece, self.xp) if piece.flags.c_contiguous or is_device_array(arr)
                        else to_device(arr, self.xp)[src])
        keep = [item for item in self.items if item[2] > index]
        self.live_bytes -= sum(item[1].nbytes for item in self.items if item[2] <= index and not is_device_array(
            item[1]))
        self.items = keep
        return acc

    def write(self, index: int, region: Region, values: Array) -> None:
        """Keep ``values`` (device, ``(C,) + region`` shape) of tile ``index`` for the later tiles covering it."""
        later = [j for j in range(index + 1, len(self.boxes))
                 if self.boxes[j] is not None and _intersect(self.boxes[j], region) is not None]  # type: ignore[arg-type]
        if not later:
            return
        if later == [index + 1]:  # only the next tile: keep it on the device (a copy: not the whole tile sum)
            self.items.append((region, values.copy(), index + 1))
            return
        arr = host_empty(values.shape, np.float32, self.xp)
        to_host_into(values, arr)
        self.items.append((region, arr, later[-1]))
        self.live_bytes += arr.nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)


def _partial_sums(shape: tuple[int, ...], dtype: Any, xp: ModuleType) -> np.ndarray:
    """The host accumulator ``(C, X, Y, Z)`` of partial sums, ``np.zeros``: pages are touched only where written.
    With numpy it is the accumulator itself (C order). For a device it only receives overlap slabs, so its memory
    runs z-major (a ``(Z, Y, X, C)`` array seen transposed): the z-slab of a shifted last tile then touches its own
    pages only — in C order every 4 KB page holds a piece of every z-range and the slab would touch them all."""
    if xp is np:
        return host_empty(shape, dtype, xp, zero=True, pinned=False)
    return np.zeros(shape[::-1], dtype).transpose(tuple(range(len(shape)))[::-1])


def _add(acc: Array, other: Array) -> Array:
    acc += other
    return acc


def _later_slabs(final: tuple[slice, ...], vol_sl: tuple[slice, ...]) -> list[tuple[slice, ...]]:
    """The parts of a tile (in its in-volume coordinates) that later tiles cover: per axis where the final part
    ends before the tile, the slab beyond it (full extent on the other axes; corners are written twice, same
    values)."""
    sizes = [v.stop - v.start for v in vol_sl]
    slabs = []
    for axis, (f, n) in enumerate(zip(final, sizes)):
        if f.stop < n:
            slabs.append(tuple(slice(max(f.stop, 0), n) if a == axis else slice(0, sizes[a]) for a in range(3)))
    return slabs


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
                 on_tile: Callable[[], None] | None = None, divisor: int = 16, prior: Prior | None = None,
                 out: np.ndarray | None = None, on_decided: Callable[[Array, tuple[slice, ...]], None] | None = None
                 ) -> tuple[np.ndarray, TilePlan, np.ndarray | None]:
    """Tile-major inference of ``runners`` over ``volume`` (X, Y, Z float32, on ``xp``'s device or the host).

    Per tile: every runner's output (softmax, or raw with ``activation="none"``), times the tile's blending factor,
    is summed on the device, on top of ``base``'s values for the tile (host float array ``(channels, X, Y, Z)`` of
    earlier contributions, or zeros); the voxels final in this tile are decided (``decide``, e.g. argmax → uint8)
    and copied into the host label volume; the rest of the sum goes back to ``base`` for the later tiles that cover
    it (``keep_all``: the whole sum goes back — ``base`` then holds the blended scores of these runners). ``base``
    is allocated on first need (``base_dtype``, ``np.zeros``: only the pages written are ever touched). On the
    device only the slabs of a tile that a later tile covers are written back (overlap slabs, not whole tiles).
    ``prior(plan, start, vol_sl)`` adds earlier contributions computed on the device (the recomputed fold 0 of
    :func:`infer_ensemble`'s pass 2) to the tile's sum. ``out``: the host uint8 array (or view) the labels go to
    (default: a new one); ``on_decided(labels, dest)`` sees each tile's decided labels on the device before they are
    copied to ``dest`` (a :class:`_Census`). Returns ``(labels uint8 host, plan, base)``.

    Host work per tile on the device path is bounded by the overlap: a tile reads back only the slabs earlier tiles
    wrote (:func:`_earlier_slabs`; a caller's ``base`` is read whole), and slabs go to ``base`` in its memory order
    (the device transposes)."""
    plan = plan_tiles(volume.shape, effective_roi(volume.shape, tuple(int(r) for r in roi), divisor), overlap)
    weights = _Weights(plan, blend, xp)
    ends = _final_ends(plan)
    labels = host_empty(plan.shape, np.uint8, xp, zero=True) if out is None else out
    own_base = base is None  # our own partial sums: only the overlap slabs of earlier tiles hold anything
    prev_end = _prev_ends(plan)
    slabs = _SlabStore(plan, xp) if own_base and not keep_all and xp is not np else None
    if keep_all and base is None:
        base = _partial_sums((channels,) + plan.shape, base_dtype, xp)
    for index, start in enumerate(plan.starts):
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
        elif base is not None and not own_base:  # device, a caller's base: earlier contributions everywhere
            acc = to_device(base[region], xp).astype(xp.float32)
        elif slabs is not None:  # device, our partial sums: the slabs earlier tiles left over this one
            acc = slabs.read(index, channels)
        elif base is not None:  # device, our partial sums: copy up only the slabs earlier tiles left
            for part in _earlier_slabs(plan, prev_end, start, vol_sl):
                if acc is None:
                    acc = xp.zeros((channels,) + tuple(v.stop - v.start for v in vol_sl), xp.float32)
                src = (slice(None),) + tuple(slice(v.start + p.start, v.start + p.stop) for v, p in zip(vol_sl, part))
                acc[(slice(None),) + part] = to_device(base[src], xp)
        if prior is not None:
            earlier = prior(plan, start, vol_sl)
            if earlier is not None:
                acc = earlier if acc is None else _add(acc, earlier)
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
            decided = decide(acc[(slice(None),) + final], xp)
            if on_decided is not None:
                on_decided(decided, dest)
            labels[dest] = to_host(decided)
        rest = keep_all or any(f.stop < v.stop - v.start for f, v in zip(final, vol_sl))
        if rest and slabs is not None:
            for part in _later_slabs(final, vol_sl):
                slabs.write(index, tuple((v.start + p.start, v.start + p.stop) for v, p in zip(vol_sl, part)),
                            acc[(slice(None),) + part])
        elif rest and not in_place:
            if base is None:
                base = _partial_sums((channels,) + plan.shape, base_dtype, xp)
            for part in ([tuple(slice(0, v.stop - v.start) for v in vol_sl)] if keep_all else
                         _later_slabs(final, vol_sl)):  # only what later tiles read: overlap slabs
                dest = (slice(None),) + tuple(slice(v.start + p.start, v.start + p.stop) for v, p in zip(vol_sl, part))
                to_host_into(acc[(slice(None),) + part].astype(base.dtype, copy=False), base[dest])  # cast on device
        del acc
        if on_tile is not None:
            on_tile()
    return labels, plan, base


def _z_occupancy(labels: Array, xp: ModuleType = np) -> tuple[Array, Array]:
    """Per z slice of a merged-class map (on ``xp``'s device): whether it holds an organ class, and tumor."""
    organ = (labels >= _ORGAN_CLASSES[0]) & (labels <= _ORGAN_CLASSES[1])
    return organ.any(axis=(0, 1)), (labels == MERGED_TUMOR).any(axis=(0, 1))


def _z_range(organ_z: np.ndarray, tumor_z: np.ndarray, spacing_z: float, margin_mm: float) -> tuple[int, int] | None:
    zs = np.flatnonzero(organ_z)
    if zs.size == 0:
        return None
    margin = int(np.ceil(margin_mm / spacing_z))
    z0, z1 = max(0, int(zs[0]) - margin), min(organ_z.shape[0], int(zs[-1]) + 1 + margin)
    tz = np.flatnonzero(tumor_z)
    if tz.size and (tz[0] < z0 or tz[-1] >= z1):
        return None
    return z0, z1


def abdominal_z_range(labels: np.ndarray, spacing_z: float, margin_mm: float = Z_MARGIN_MM) -> tuple[int, int] | None:
    """z-range [z0, z1) of merged organ classes, widened by ``margin_mm``; None when there is no organ or when
    tumor lies outside the range (then the other folds must see the whole volume)."""
    organ_z, tumor_z = _z_occupancy(labels)
    return _z_range(organ_z, tumor_z, spacing_z, margin_mm)


class _Census:
    """What the device learns about the labels while it decides them, tile by tile (``tiled_labels``'s
    ``on_decided``), so that the host never scans the label volume: per decided region the classes present (one
    ``bincount``; their union gives every class a bounding box — a superset at tile granularity, which is all the
    label stage needs) and, in pass 1, the z slices holding organ / tumor voxels (exact: the z-range)."""

    def __init__(self, shape: tuple[int, ...], channels: int, xp: ModuleType) -> None:
        self.xp, self.channels = xp, channels
        self.regions: list[tuple[tuple[slice, ...], np.ndarray]] = []
        self.organ_z = np.zeros(shape[2], bool)
        self.tumor_z = np.zeros(shape[2], bool)
        self.track_z = True

    def __call__(self, lab: Array, dest: tuple[slice, ...]) -> None:
        xp = self.xp
        present = to_host(xp.bincount(lab.ravel(), minlength=self.channels) > 0)
        self.regions.append((dest, present))
        if self.track_z:
            organ_z, tumor_z = _z_occupancy(lab, xp)
            self.organ_z[dest[2]] |= to_host(organ_z)
            self.tumor_z[dest[2]] |= to_host(tumor_z)

    def boxes(self) -> list[tuple[slice, ...] | None]:
        """Box per class (``label_boxes`` style: index = class, entry 0 None), the union of the regions where the
        class was decided; regions decided twice (pass 1, then pass 2) count both times — a superset."""
        lo = np.full((self.channels, 3), np.iinfo(np.int64).max)
        hi = np.full((self.channels, 3), -1)
        for dest, present in self.regions:
            lo[present] = np.minimum(lo[present], [s.start for s in dest])
            hi[present] = np.maximum(hi[present], [s.stop for s in dest])
        return [None] + [None if hi[k, 0] < 0 else tuple(slice(int(a), int(b)) for a, b in zip(lo[k], hi[k]))
                         for k in range(1, self.channels)]

    def offset(self, z0: int) -> Callable[[Array, tuple[slice, ...]], None]:
        """This census for a pass on the z-range from ``z0`` (its regions shifted back to the whole volume)."""
        return lambda lab, dest: self(lab, (dest[0], dest[1], slice(dest[2].start + z0, dest[2].stop + z0)))


@dataclass
class EnsembleResult:
    labels: np.ndarray                    # uint8 merged classes (X, Y, Z), host
    tiles: int
    roi: tuple[int, int, int]
    z_range: tuple[int, int] | None       # the folds 1..N-1 range (None: whole volume)
    folds: int
    per_fold_tiles: list[int] = field(default_factory=list)
    fold0_recomputed: int = 0             # device path: fold 0's pass-1 tiles run again in pass 2 (no parking)
    boxes: list[tuple[slice, ...] | None] | None = None  # device path: a box per class (superset), from the tiles
    groups: list[list[int]] = field(default_factory=list)  # grouped design: the folds run together, in order


class _Fold0OnPass1Grid:
    """Pass 2's ``prior`` on the device: fold 0's blended softmax over the z-range, recomputed tile by tile on
    **pass 1's tile grid** (so fold 0's tile positions — and the labels — are those of the classic fold-major
    ensemble), never parked on the host.

    Pass 2's grid (the z-cropped volume) shares pass 1's x/y tile starts (same x/y sizes and tile). Each pass-1 tile
    of a column is assigned, slice by slice along z, to the pass-2 tile of the same column whose *fresh* z-interval
    (not covered by an earlier tile of that column) holds the slice — the fresh intervals partition the z-range, so
    every fold-0 contribution is added exactly once; the x/y overlaps between columns go through the usual partial
    sums. A pass-1 tile's output stays on the device while pass-2 tiles of its column still need it (at most two
    tile-sized buffers with non-overlapping tiles)."""

    def __init__(self, volume: Array, runner: TileRunner, plan0: TilePlan, blend: str, xp: ModuleType,
                 z0: int) -> None:
        self.volume, self.run, self.plan0, self.xp, self.z0 = volume, runner, plan0, xp, z0
        self.weights = _Weights(plan0, blend, xp)
        self.cache: dict[tuple[int, int, int], tuple[Array, tuple[slice, ...]]] = {}
        self.column: tuple[int, int] | None = None
        self.runs = 0

    def _fold0(self, start: tuple[int, int, int]) -> tuple[Array, tuple[slice, ...]]:
        if start not in self.cache:
            parts = tile_to_target(self.plan0, start)
            assert parts is not None
            tile_sl, vol_sl = parts
            tile = self.xp.zeros((1, 1) + tuple(self.plan0.roi), dtype=self.xp.float32)
            tile[(0, 0) + tile_sl] = to_device(self.volume[vol_sl], self.xp)
            scores = softmax_(self.run(tile)[0], self.xp)
            factor = self.weights.factor(start)
            if factor is not None:
                scores *= factor
            self.cache[start] = (scores[(slice(None),) + tile_sl], vol_sl)
            self.runs += 1
        return self.cache[start]

    def __call__(self, plan: TilePlan, start: tuple[int, int, int], vol_sl: tuple[slice, ...]) -> Array | None:
        column = (start[0], start[1])
        if column != self.column:
            self.cache.clear()
            self.column = column
        # this pass-2 tile's fresh z-interval, in full-volume coordinates
        starts_z = sorted({s[2] for s in plan.starts})
        k = starts_z.index(start[2])
        fresh_lo = max(start[2], starts_z[k - 1] + plan.roi[2]) if k else start[2]
        lo = max(fresh_lo, plan.pad_before[2]) - plan.pad_before[2] + self.z0
        hi = min(start[2] + plan.roi[2], plan.pad_before[2] + plan.shape[2]) - plan.pad_before[2] + self.z0
        out = None
        for s0 in self.plan0.starts:
            if (s0[0], s0[1]) != column:
                continue
            z_lo, z_hi = s0[2] - self.plan0.pad_before[2], s0[2] - self.plan0.pad_before[2] + self.plan0.roi[2]
            a, b = max(lo, z_lo, 0), min(hi, z_hi)
            if b <= a:
                continue
            scores, g_sl = self._fold0(s0)
            if out is None:
                out = self.xp.zeros((scores.shape[0],) + tuple(v.stop - v.start for v in vol_sl), self.xp.float32)
            zs = g_sl[2].start
            src = scores[:, :, :, a - zs:b - zs]
            dz = vol_sl[2].start + self.z0
            out[:, :, :, a - dz:b - dz] += src
        for s0 in [s for s, (_, g) in self.cache.items() if g[2].stop <= hi]:
            del self.cache[s0]  # no later pass-2 tile of this column needs it
        return out


def infer_ensemble(volume: Array, engines: Sequence[Any], roi: Sequence[int], xp: ModuleType = np, *,
                   overlap: float = 0.0, blend: str = "constant", spacing_z: float = 1.0, z_crop: bool = True,
                   park_dtype: Any = None, progress: Progress | None = None,
                   on_tile: Callable[[], None] | None = None, group: int | None = None,
                   divisor: int = 16) -> EnsembleResult:
    """The fold ensemble over ``volume`` (X, Y, Z normalised float32 on ``xp``'s device or the host): uint8 merged
    labels on the host. With several folds and ``z_crop``: pass 1 runs fold 0 alone (its labels decide the
    abdominal z-range), pass 2 runs folds 1..N-1 tile-major on that range, on top of fold 0's probabilities there.

    Where fold 0's probabilities come from in pass 2 depends on the device (one decision, here):

    - host (numpy): pass 1 keeps them in a float32 accumulator (``park_dtype``) — on the CPU a recomputation would
      be a whole extra fold, the largest cost of all, and host memory is where the work happens anyway;
    - device (CuPy, or a stand-in): nothing is parked on the host — fold 0 is recomputed on pass 1's tiles inside
      the z-range (:class:`_Fold0OnPass1Grid`), on the device, in pass 2. Costs one fold over the z-range of
      network time; saves a volume-sized host array (≈ 1.4 GB fp16 for the worst case) and its scatter/gather.

    ``group`` (the memory plan's ``grouped`` design, fewer than ``len(engines)``): :func:`_grouped` instead — at
    most ``group`` engines are used together (``engines`` may create them on access and drop others:
    :class:`flare.runtime.inference.sessions.FoldSessions`). ``divisor``: the folds' spatial divisor (the
    bundle's :attr:`~flare.runtime.bundle.manifest.Bundle.fold_divisor`): tiles are padded up to its multiples.
    """
    if not engines:
        raise ValueError("at least one fold engine is needed")
    if group is not None and group < len(engines):
        return _grouped(volume, engines, roi, xp, group, overlap=overlap, blend=blend, spacing_z=spacing_z,
                        z_crop=z_crop, park_dtype=park_dtype, progress=progress, on_tile=on_tile, divisor=divisor)
    runners = [tile_runner(e, xp) for e in engines]
    kw: dict[str, Any] = {"channels": engines[0].out_channels, "overlap": overlap, "blend": blend,
                          "progress": progress, "on_tile": on_tile, "divisor": divisor}
    n = len(engines)
    on_host = xp is np
    census = None if on_host else _Census(volume.shape, kw["channels"], xp)  # the device counts, not the host
    if n == 1 or not z_crop:  # float32 partial sums: only the pages of overlapping slabs are ever touched
        labels, plan, _ = tiled_labels(volume, runners, roi, xp, on_decided=census, **kw)
        return EnsembleResult(labels, plan.n_tiles * n, plan.roi, None, n, [plan.n_tiles] * n,
                              boxes=None if census is None else census.boxes())
    park = park_dtype or np.float32
    labels, plan, parked = tiled_labels(volume, runners[:1], roi, xp, keep_all=on_host, base_dtype=park,
                                        on_decided=census, **kw)
    z_range = (abdominal_z_range(labels, spacing_z) if census is None else
               _z_range(census.organ_z, census.tumor_z, spacing_z, Z_MARGIN_MM))
    z0, z1 = z_range if z_range is not None else (0, volume.shape[2])
    if on_host:
        assert parked is not None
        _, sub_plan, _ = tiled_labels(volume[:, :, z0:z1], runners[1:], roi, xp, base=parked[:, :, :, z0:z1],
                                        out=labels[:, :, z0:z1], **kw)  # every voxel is final in one tile
        del parked
        recomputed = 0
    else:
        assert census is not None
        census.track_z = False
        fold0 = _Fold0OnPass1Grid(volume, runners[0], plan, blend, xp, z0)
        _, sub_plan, _ = tiled_labels(volume[:, :, z0:z1], runners[1:], roi, xp, prior=fold0,
                                      out=labels[:, :, z0:z1], on_decided=census.offset(z0), **kw)  # in place
        recomputed = fold0.runs
    tiles = [plan.n_tiles] + [sub_plan.n_tiles] * (n - 1)
    return EnsembleResult(labels, sum(tiles) + recomputed, plan.roi, z_range, n, tiles, recomputed,
                          boxes=None if census is None else census.boxes())


def _grouped(volume: Array, engines: Sequence[Any], roi: Sequence[int], xp: ModuleType, group: int, *,
             overlap: float, blend: str, spacing_z: float, z_crop: bool, park_dtype: Any, progress: Progress | None,
             on_tile: Callable[[], None] | None, divisor: int = 16) -> EnsembleResult:
    """The ensemble with at most ``group`` engines in use at a time (the ``grouped`` design of the memory plan):
    fold-major across groups, tile-major within a group, as the paper's ensemble accumulated. Pass 1 runs fold 0
    alone (with the z-crop; else the first group) and keeps its blended softmax in a host accumulator
    (``park_dtype``, float32 by default: z-major ``np.zeros``, pages touched as tiles write them); its labels
    decide the z-range; each further group adds its folds' softmax over that range on top, tile by tile (read up
    from the accumulator, written back whole), and the last group decides the labels. Same tiles and sums as the
    resident design, up to float32 summation order."""
    n = len(engines)
    park = park_dtype or np.float32
    first = [0] if z_crop else list(range(min(group, n)))
    rest = list(range(len(first), n))
    groups = [first] + [rest[i:i + group] for i in range(0, len(rest), group)]
    kw: dict[str, Any] = {"channels": engines[0].out_channels, "overlap": overlap, "blend": blend,
                          "progress": progress, "on_tile": on_tile, "divisor": divisor}

    def runners(idx: list[int]) -> list[TileRunner]:
        return [tile_runner(engines[i], xp) for i in idx]  # engines[i] may create the session (and drop another)

    census = None if xp is np else _Census(volume.shape, kw["channels"], xp)
    labels, plan, acc = tiled_labels(volume, runners(first), roi, xp, keep_all=len(groups) > 1, base_dtype=park,
                                     on_decided=census, **kw)
    z_range = None
    if z_crop:
        z_range = (abdominal_z_range(labels, spacing_z) if census is None else
                   _z_range(census.organ_z, census.tumor_z, spacing_z, Z_MARGIN_MM))
    z0, z1 = z_range if z_range is not None else (0, volume.shape[2])
    tiles = [plan.n_tiles] * len(first)
    for g, idx in enumerate(groups[1:], start=2):
        assert acc is not None
        last = g == len(groups)
        if census is not None:
            census.track_z = False
        _, sub_plan, _ = tiled_labels(volume[:, :, z0:z1], runners(idx), roi, xp, base=acc[:, :, :, z0:z1],
                                      keep_all=not last, out=labels[:, :, z0:z1],
                                      on_decided=census.offset(z0) if census is not None and last else None, **kw)
        tiles += [sub_plan.n_tiles] * len(idx)
    del acc
    return EnsembleResult(labels, sum(tiles), plan.roi, z_range, n, tiles, groups=groups,
                          boxes=None if census is None else census.boxes())


def planned_tiles(shape: tuple[int, int, int], roi: tuple[int, int, int], overlap: float, divisor: int = 16) -> int:
    """Number of tiles one fold needs for ``shape`` in ``roi`` tiles (the progress total), at most ``FLARE_MAX_TILES``
    (:func:`flare.runtime.inference.tiling.max_tiles`; more is a one-line ``InputError``: the gate before inference)."""
    return plan_tiles(shape, effective_roi(shape, roi, divisor), overlap, limit=max_tiles()).n_tiles


def infer_with_budget(volume: Array, engines: Sequence[Any], bundle_roi: Sequence[int], xp: ModuleType = np, *,
                      plan: Any = None, overlap: float = 0.0, blend: str = "constant",
                      spacing_z: float = 1.0, progress: Progress | None = None,
                      on_tile: Callable[[], None] | None = None,
                      on_cpu: Callable[[], EnsembleResult] | None = None, group: int | None = None,
                      divisor: int = 16) -> tuple[EnsembleResult, dict[str, Any]]:
    """:func:`infer_ensemble` under the memory plan (:class:`flare.runtime.inference.memory_plan.MemoryPlan`):
    its tiles (the bundle's roi when no memory model applies — the CPU), retried with smaller tiles on
    out-of-memory errors, then ``on_cpu()``. Returns the result and a report part:
    ``{"budget_mb", "rois_tried", "fallback", "gpu_peak_mb", "plan"}``."""
    from flare.runtime.inference.budget import run_with_fallback
    from flare.runtime.inference.device import DeviceMemoryPeak

    applies = plan is not None and plan.applies
    rois: list[tuple[int, ...]] = [tuple(int(r) for r in bundle_roi)]
    if applies:
        rois = list(plan.rois(volume.shape, overlap=overlap, channels=engines[0].out_channels, divisor=divisor))
    peak = DeviceMemoryPeak(getattr(engines[0], "device_id", 0)) if applies else None
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
                              progress=progress, on_tile=sample, group=group, divisor=divisor)

    alive = getattr(engines, "alive_engines", None)  # a session pool: shrink what is alive, make nothing
    result = run_with_fallback(attempt, rois, on_cpu, record=fallback,
                               engines=alive() if callable(alive) else engines)  # type: ignore[arg-type]
    gpu_peak = None if peak is None or peak.peak_mb is None else round(peak.peak_mb, 1)
    return result, {"budget_mb": plan.budget_mb if plan is not None else None, "rois_tried": tried,
                    "fallback": fallback, "gpu_peak_mb": gpu_peak, "plan": plan.report() if plan is not None else None}
