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
"""

from __future__ import annotations

import numpy as np
from flare.runtime.foundation.labels import AORTA, LEFT_RIGHT_PAIRS
from flare.runtime.ops.components import components
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


def _labels_centre_line(labels: np.ndarray, affine: np.ndarray) -> ReferenceLine | None:
    """Fallback: constant x at the centre of the world-x extent of all labelled voxels (box corners suffice)."""
    box = box_from_mask(labels != 0)
    if box is None:
        return None
    corners = np.array(np.meshgrid(*[(lo, hi - 1) for lo, hi in zip(box.lo, box.hi)], indexing="ij")).reshape(3, -1)
    world_x = affine[0, :3] @ corners + affine[0, 3]
    return ReferenceLine(np.zeros(1), np.array([(world_x.min() + world_x.max()) / 2.0]), "labels-centre")


def reference_line(labels: np.ndarray, affine: np.ndarray) -> ReferenceLine | None:
    """The aorta centre line of ``labels`` in world mm, or the labels-centre fallback; ``None`` for an empty map."""
    aorta = labels == AORTA
    box = box_from_mask(aorta)
    if box is None:
        return _labels_centre_line(labels, affine)
    world_x, world_z = _world_xz(np.nonzero(aorta[box.slices]), box.lo, affine)
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
                line: ReferenceLine) -> None:
    """Relabel the patient-left part of ``right_id`` in ``out`` as ``left_id`` (``labels`` is read-only)."""
    mask = labels == right_id
    box = box_from_mask(mask)
    if box is None:
        return
    offset = box.lo
    ids, counts = components(mask[box.slices])
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


def split_left_right(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Relabel the patient-left kidney (2 -> 13) and adrenal gland (7 -> 8) of a FLARE-id map; returns a new map.

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
    out = labels.copy()
    line = reference_line(labels, affine)
    if line is None:
        return out
    for right_id, left_id in LEFT_RIGHT_PAIRS:
        _split_pair(labels, out, right_id, left_id, affine, line)
    return out
