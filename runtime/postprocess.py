"""Post-processing of a FLARE-id label map (the paper's rules), torch-free.

Three rules, applied in this order by :func:`postprocess`, one function each:

1. :func:`remove_small_tumors` — tumor (id 14) components smaller than ``min_tumor_voxels`` voxels *at 1 mm*
   (i.e. ``min_tumor_voxels`` mm³) become background.
2. :func:`keep_largest_components` — for each listed organ id only its largest connected component survives.
3. :func:`keep_largest_z_run` — the paper's 1-D pass: the union of organs (ids 1..13, never tumor) is projected on the z axis;
   of the runs of occupied slices only the one holding the most organ voxels is kept, organ voxels in the other
   runs become background (organs are not split by an empty gap along z; tumors may sit anywhere).

Connected components are 26-connected (face, edge and corner neighbours), computed with ``cc3d``
(connected-components-3d), which is about 6x faster than ``scipy.ndimage.label`` on FLARE-size maps. Each
component pass works only inside the bounding box of the id it treats (one ``scipy.ndimage.find_objects`` scan
gives all boxes), and edits the label map in place through views of that box.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from .labels import LARGEST_COMPONENT_IDS, TUMOR

__all__ = [
    "CONNECTIVITY",
    "components",
    "keep_largest_components",
    "keep_largest_z_run",
    "label_boxes",
    "postprocess",
    "remove_small_tumors",
]

#: voxel connectivity of every connected-component pass (26: faces, edges and corners)
CONNECTIVITY: Final = 26

Box = tuple[slice, ...]


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of a boolean mask.

    Returns ``(ids, counts)``: the component id of every voxel (0 = outside the mask, 1..N components) and the
    voxel count of each id (``counts[0]`` counts the voxels outside the mask).
    """
    import cc3d

    mask = np.ascontiguousarray(mask, dtype=bool)
    singleton = [a for a in range(mask.ndim) if mask.shape[a] == 1]
    if mask.ndim == 3 and len(singleton) >= 2:
        # cc3d (3.x) fails ("maximum length exception") on line-shaped masks with two axes of size 1: label a copy
        # padded with zeros to size 2 along one of them (no new neighbours), then drop the padding
        padded = np.ascontiguousarray(np.concatenate([mask, np.zeros_like(mask)], axis=singleton[0]))
        ids, n = cc3d.connected_components(padded, connectivity=CONNECTIVITY, return_N=True)
        ids = np.ascontiguousarray(np.take(ids, [0], axis=singleton[0]))
    else:
        ids, n = cc3d.connected_components(mask, connectivity=CONNECTIVITY, return_N=True)
    # count only the mask's voxels: np.bincount over the whole box would first cast every id to intp (slow)
    counts = np.bincount(ids[mask], minlength=n + 1)
    counts[0] = mask.size - int(counts[1:].sum())
    return ids, counts


def label_boxes(labels: np.ndarray, max_label: int = 14) -> list[Box | None]:
    """Bounding box (tuple of slices) of every id ``0..max_label`` in one scan; ``None`` where the id is absent.

    Entry 0 (background) is always ``None``.
    """
    from scipy import ndimage

    found = ndimage.find_objects(labels, max_label=max_label)
    return [None, *found]


def _check_labels(labels: np.ndarray) -> None:
    if labels.dtype != np.uint8:
        raise ValueError(f"label map must be uint8, got {labels.dtype}")
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3-D, got shape {labels.shape}")


def remove_small_tumors(labels: np.ndarray, spacing: tuple[float, float, float], min_tumor_voxels: int = 100,
                        box: Box | None = None) -> int:
    """Rule 1, in place: tumor components under ``min_tumor_voxels`` mm³ (voxels at 1 mm) become background.

    The threshold scales with the voxel volume: a component of ``n`` voxels is removed when
    ``n * prod(spacing) < min_tumor_voxels``. ``box`` (optional) is the tumor's bounding box. Returns the number of
    voxels removed.
    """
    if min_tumor_voxels <= 0:
        return 0
    if box is None:
        box = label_boxes(labels, TUMOR)[TUMOR]
        if box is None:
            return 0
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    if voxel_mm3 <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    sub = labels[box]
    ids, counts = components(sub == TUMOR)
    # relative tolerance so that e.g. 100 voxels of 1 mm³ against 100 mm³ is not lost to rounding
    small = counts * voxel_mm3 < min_tumor_voxels * (1.0 - 1e-9)
    small[0] = False
    if not small.any():
        return 0
    drop = small[ids]
    sub[drop] = 0
    return int(np.count_nonzero(drop))


def keep_largest_components(labels: np.ndarray, label_ids: tuple[int, ...] = LARGEST_COMPONENT_IDS,
                            boxes: list[Box | None] | None = None) -> int:
    """Rule 2, in place: for each id in ``label_ids`` keep only its largest 26-connected component.

    Ties keep the component with the lowest id (first in memory order). ``boxes`` (optional) are
    :func:`label_boxes` of ``labels``. Returns the number of voxels removed.
    """
    if boxes is None:
        boxes = label_boxes(labels, max(label_ids, default=0))
    removed = 0
    for label_id in label_ids:
        box = boxes[label_id] if label_id < len(boxes) else None
        if box is None:
            continue
        sub = labels[box]
        ids, counts = components(sub == label_id)
        if len(counts) <= 2:  # background + at most one component
            continue
        largest = int(np.argmax(counts[1:])) + 1
        drop = (ids != largest) & (ids != 0)
        sub[drop] = 0
        removed += int(np.count_nonzero(drop))
    return removed


def _occupied_runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` index runs of consecutive True values of a 1-D boolean array."""
    padded = np.concatenate(([False], occupied, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]


def keep_largest_z_run(labels: np.ndarray, z_axis: int = 2) -> int:
    """Rule 3, in place: keep only the run of z slices (runs split by organ-free slices) with most organ voxels.

    Organs are ids 1..13; tumor (14) voxels are never touched. Ties keep the first run. Returns the number of
    voxels removed.
    """
    # (labels - 1) wraps background to 255 in uint8, so "< 13" selects exactly ids 1..13
    organ = (labels - np.uint8(1)) < np.uint8(TUMOR - 1)
    other_axes = tuple(ax for ax in range(labels.ndim) if ax != z_axis % labels.ndim)
    per_slice = np.count_nonzero(organ, axis=other_axes)
    runs = _occupied_runs(per_slice > 0)
    if len(runs) <= 1:
        return 0
    keep = max(range(len(runs)), key=lambda r: (int(per_slice[runs[r][0]:runs[r][1]].sum()), -r))
    lab_z = np.moveaxis(labels, z_axis, -1)  # views: writes go to ``labels``
    organ_z = np.moveaxis(organ, z_axis, -1)
    removed = 0
    for r, (start, stop) in enumerate(runs):
        if r == keep:
            continue
        block = lab_z[..., start:stop]
        block[organ_z[..., start:stop]] = 0
        removed += int(per_slice[start:stop].sum())
    return removed


def postprocess(labels: np.ndarray, spacing: tuple[float, float, float], *, min_tumor_voxels: int = 100,
                largest_component: tuple[int, ...] = LARGEST_COMPONENT_IDS, z_pass: bool = True,
                z_axis: int = 2, copy: bool = True) -> np.ndarray:
    """Apply the three post-processing rules to a uint8 FLARE-id label map (after the left/right split).

    ``labels`` is expected in the RAS 1 mm grid of the pipeline (``z_axis=2`` is superior); ``spacing`` (mm per
    voxel axis) only scales the tumor threshold. Removed voxels become background (0). With ``copy=False`` the map
    is edited in place and returned (the pipeline does this to avoid a copy); the default leaves the input alone.
    """
    labels = np.asarray(labels)
    _check_labels(labels)
    out = labels.copy() if copy else labels
    boxes = label_boxes(out, TUMOR)
    if boxes[TUMOR] is not None:
        remove_small_tumors(out, spacing, min_tumor_voxels, box=boxes[TUMOR])
    keep_largest_components(out, tuple(largest_component), boxes=boxes)
    if z_pass:
        keep_largest_z_run(out, z_axis)
    return out

