"""Left/right split of merged kidneys and adrenal glands, decided in world (RAS+) coordinates, torch-free.

The networks predict one class for both kidneys and one for both adrenal glands (the paper's left/right merging);
after ``labels.merged_to_flare`` they carry the right-side ids 2 and 7. :func:`split_left_right` relabels the
patient-left parts 13 (left kidney) and 8 (left adrenal gland).

Everything is decided in world coordinates (``affine`` maps voxel indices to RAS+ mm, world +x is the patient's
right), so the result does not depend on the array's orientation or axis order.

* **Reference line**: the aorta (id 5) centre line — aorta voxels are binned by world z (bins one voxel extent
  along z wide), the mean world x of each bin is taken at the bin's mean z, and the line is interpolated linearly
  between bins and held constant beyond the first and last bin.
* **Fallback** without any aorta voxel: a constant line at the centre of the world-x extent of all labelled
  (non-zero) voxels — the middle of the labelled abdomen, which lies between the kidneys because the liver reaches
  to the right and the spleen/stomach to the left. (Without any label besides the pair itself this is the middle
  of the pair's own extent.)
* **Per merged class**: 26-connected components (cc3d). The two largest are assigned whole, each by its
  centroid's world x against the line at the centroid's world z (x below the line = patient left). If both land
  on the same side, and for all smaller components (and a lone component), every voxel is assigned by its own
  side of the line.

Given the bounding boxes of the ids (``boxes``, as :func:`flare.runtime.ops.components.label_boxes` returns them)
every step reads only the box of the id it treats — the aorta's, each pair's, their union for the fallback — and
``copy=False`` relabels in place: no whole-map pass at all (the pipeline computes the boxes once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flare.runtime.foundation.labels import AORTA, LEFT_RIGHT_PAIRS
from flare.runtime.ops.components import Box, box_union, components
from flare.runtime.ops.geometry import Box as Box3
from flare.runtime.ops.geometry import box_from_mask

__all__ = ["ReferenceLine", "reference_line", "split_left_right"]


class ReferenceLine:
    """A midline x(z) in world mm: piecewise linear through ``(z, x)`` points, constant beyond the ends."""

    def __init__(self, z: np.ndarray, x: np.ndarray, source: str) -> None:
        self.z = np.asarray(z, dtype=np.float64)
        self.x = np.asarray(x, dtype=np.float64)
        self.source = source  #: "aorta" or "labels-centre"

    def x_at(self, z: np.ndarray | float) -> np.ndarray:
        """World x of the line at world height(s) ``z``."""
        return np.asarray(np.interp(z, self.z, self.x))

    def is_left(self, world_x: np.ndarray | float, world_z: np.ndarray | float) -> np.ndarray:
        """True where a world point lies on the patient's left of the line (smaller world x)."""
        return np.asarray(world_x) < self.x_at(world_z)


def _world_xz(indices: tuple[np.ndarray, ...], offset: tuple[int, ...], affine: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """World x and z (mm) of voxels given as ``np.nonzero``-style indices inside a box starting at ``offset``."""
    world_x = np.full(indices[0].shape, affine[0, 3], dtype=np.float64)
    world_z = np.full(indices[0].shape, affine[2, 3], dtype=np.float64)
    for axis, (idx, start) in enumerate(zip(indices, offset)):
        coord = idx.astype(np.float64) + start
        world_x += affine[0, axis] * coord
        world_z += affine[2, axis] * coord
    return world_x, world_z


Boxes = Sequence[Box | None]


def _view(labels: np.ndarray, box: Box | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """``labels`` inside ``box`` (a view) and the box's offset; the whole map when ``box`` is None."""
    if box is None:
        return labels, (0,) * labels.ndim
    return labels[box], tuple(int(s.start or 0) for s in box)


def _labels_centre_line(labels: np.ndarray, affine: np.ndarray, boxes: Boxes | None = None) -> ReferenceLine | None:
    """Fallback: constant x at the centre of the world-x extent of all labelled voxels (box corners suffice)."""
    if boxes is not None:
        union = box_union(list(boxes)[1:])  # id 0, background, excluded
        extent = None if union is None else (tuple(int(a.start) for a in union), tuple(int(a.stop) for a in union))
    else:
        box = box_from_mask(labels != 0)
        extent = None if box is None else (box.lo, box.hi)
    if extent is None:
        return None
    corners = np.array(np.meshgrid(*[(lo, hi - 1) for lo, hi in zip(*extent)], indexing="ij")).reshape(3, -1)
    world_x = affine[0, :3] @ corners + affine[0, 3]
    return ReferenceLine(np.zeros(1), np.array([(world_x.min() + world_x.max()) / 2.0]), "labels-centre")


def reference_line(labels: np.ndarray, affine: np.ndarray, boxes: Boxes | None = None) -> ReferenceLine | None:
    """The aorta centre line of ``labels`` in world mm, or the labels-centre fallback; ``None`` for an empty map.
    With ``boxes`` (per id) only the aorta's box is read."""
    if boxes is not None and (len(boxes) <= AORTA or boxes[AORTA] is None):
        return _labels_centre_line(labels, affine, boxes)
    view, offset = _view(labels, None if boxes is None else boxes[AORTA])
    aorta = view == AORTA
    box = box_from_mask(aorta)
    if box is None:
        return _labels_centre_line(labels, affine, boxes)
    world_x, world_z = _world_xz(np.nonzero(aorta[box.slices]), tuple(o + lo for o, lo in zip(offset, box.lo)),
                                 affine)
    bin_mm = float(np.max(np.abs(affine[2, :3]))) or 1.0  # one voxel's extent along world z
    bins = np.floor((world_z - world_z.min()) / bin_mm).astype(np.intp)
    count = np.bincount(bins)
    used = count > 0
    mean_z = np.bincount(bins, weights=world_z)[used] / count[used]
    mean_x = np.bincount(bins, weights=world_x)[used] / count[used]
    return ReferenceLine(mean_z, mean_x, "aorta")


def _whole_component_sides(ids: np.ndarray, counts: np.ndarray, offset: tuple[int, ...], affine: np.ndarray,
                           line: ReferenceLine) -> dict[int, bool]:
    """Component id -> is-left for the two largest components when their centroids lie on opposite sides."""
    if len(counts) < 3:  # background + fewer than two components
        return {}
    sizes = counts.copy()
    sizes[0] = 0
    first, second = (int(c) for c in np.argsort(sizes, kind="stable")[::-1][:2])
    sides: dict[int, bool] = {}
    for comp in (first, second):
        centroid = np.array([np.mean(idx) for idx in np.nonzero(ids == comp)], dtype=np.float64)
        world = affine[:3, :3] @ (centroid + np.asarray(offset, dtype=np.float64)) + affine[:3, 3]
        sides[comp] = bool(line.is_left(world[0], world[2]))
    return sides if sides[first] != sides[second] else {}


def _split_pair(labels: np.ndarray, out: np.ndarray, right_id: int, left_id: int, affine: np.ndarray,
                line: ReferenceLine, within: Box | None = None) -> None:
    """Relabel the patient-left part of ``right_id`` in ``out`` as ``left_id`` (``out`` may be ``labels``: the
    mask is taken before anything is written), reading only ``within`` (the id's box) when given."""
    view, start = _view(labels, within)
    mask = view == right_id
    rel = box_from_mask(mask)
    if rel is None:
        return
    offset = tuple(o + lo for o, lo in zip(start, rel.lo))
    box = Box3(offset, tuple(o + hi for o, hi in zip(start, rel.hi)))  # in the whole map
    ids, counts = components(mask[rel.slices])
    whole = _whole_component_sides(ids, counts, offset, affine, line)
    is_left_lut = np.zeros(len(counts), dtype=bool)
    per_voxel_lut = np.ones(len(counts), dtype=bool)
    per_voxel_lut[0] = False
    for comp, comp_left in whole.items():
        is_left_lut[comp] = comp_left
        per_voxel_lut[comp] = False
    out_box = out[box.slices]
    out_box[is_left_lut[ids]] = left_id
    voxels = np.nonzero(per_voxel_lut[ids])
    if voxels[0].size:
        world_x, world_z = _world_xz(voxels, offset, affine)
        left = line.is_left(world_x, world_z)
        out_box[tuple(idx[left] for idx in voxels)] = left_id


def split_left_right(labels: np.ndarray, affine: np.ndarray, *, boxes: Boxes | None = None,
                     copy: bool = True) -> np.ndarray:
    """Relabel the patient-left kidney (2 -> 13) and adrenal gland (7 -> 8) of a FLARE-id map; returns a new map
    (``copy=False``: ``labels`` itself, relabelled in place). ``boxes``: the bounding box of every id (e.g.
    :func:`flare.runtime.ops.components.label_boxes`; supersets are fine): only those boxes are read.

    ``labels``: a 3-D FLARE-id label map (uint8) in any orientation and axis order in which both kidneys carry 2
    and both adrenal glands 7; ``affine``: its 4x4 voxel -> world RAS+ mm matrix. Every other voxel is unchanged.
    The side is decided against the aorta centre line in world coordinates (see the module docstring for the
    rules and the fallback when no aorta is labelled).
    """
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=np.float64)
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3-D, got shape {labels.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    out = labels.copy() if copy else labels
    line = reference_line(labels, affine, boxes)
    if line is None:
        return out
    for right_id, left_id in LEFT_RIGHT_PAIRS:
        within = None
        if boxes is not None:
            within = boxes[right_id] if right_id < len(boxes) else None
            if within is None:
                continue
        _split_pair(out, out, right_id, left_id, affine, line, within)
    return out
