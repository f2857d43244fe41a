"""``--statistics``: per-label volume and CT intensity of a label map in the grid it is written in.

Volumes are voxel counts times the voxel volume of the written (input) grid, ``|det(affine[:3, :3])|`` mm³, so they
match what any viewer measures on the output file. Intensities are the input CT's values (HU, scaling applied)
inside each label. Tumors are also counted as 26-connected components (cc3d, as post-processing does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flare.runtime.foundation.labels import LABELS, NUM_FLARE_IDS, TUMOR

__all__ = ["label_counts", "label_statistics", "label_volumes", "voxel_volume_ml"]


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel of ``affine``'s grid in millilitres (cm³)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per FLARE id (int64, ``NUM_FLARE_IDS`` entries), counted in slabs: ``np.bincount`` casts its input to
    int64, so on the whole map it would allocate 8 bytes per voxel; per slab of 256 K voxels its 2 MB cast stays in
    the cache (2.2x faster than 4 M-voxel slabs on a 512x512x300 map here)."""
    flat = labels.ravel(order="K")  # a view for any contiguous map
    counts = np.zeros(NUM_FLARE_IDS, dtype=np.int64)
    for sl in _chunks(flat.size, 1 << 18):
        part = np.bincount(flat[sl], minlength=NUM_FLARE_IDS)
        if part.size > NUM_FLARE_IDS:
            raise ValueError(f"label ids must lie in 0..{NUM_FLARE_IDS - 1}, found {part.size - 1}")
        counts += part
    return counts


def label_volumes(labels: np.ndarray, affine: np.ndarray) -> tuple[dict[str, int], dict[str, float]]:
    """``(voxels, volume_ml)`` per FLARE id present (keys are the ids as strings, as in the run report)."""
    counts = label_counts(labels)
    vml = voxel_volume_ml(affine)
    present = [i for i in range(1, NUM_FLARE_IDS) if counts[i]]
    return ({str(i): int(counts[i]) for i in present}, {str(i): round(float(counts[i]) * vml, 3) for i in present})


def label_statistics(labels: np.ndarray, image: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """Per FLARE label (all 14, absent ones with 0 voxels): id, voxels, ``volume_ml``, ``hu_mean``/``hu_std``
    (``None`` when absent), and the tumor component count with each component's volume."""
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    flat = labels.ravel(order="F")  # NIfTI data is Fortran-ordered: no copy of the image in the common case
    values = image.ravel(order="F")
    counts = label_counts(labels)
    vml = voxel_volume_ml(affine)
    sums = np.zeros(NUM_FLARE_IDS)
    for sl in _chunks(flat.size):
        sums += np.bincount(flat[sl], weights=values[sl].astype(np.float64), minlength=NUM_FLARE_IDS)
    means = np.divide(sums, counts, out=np.zeros(NUM_FLARE_IDS), where=counts > 0)
    sq = np.zeros(NUM_FLARE_IDS)  # second pass around the mean: no cancellation for large HU offsets
    for sl in _chunks(flat.size):
        dev = values[sl].astype(np.float64) - means[flat[sl]]
        sq += np.bincount(flat[sl], weights=dev * dev, minlength=NUM_FLARE_IDS)
    stds = np.sqrt(np.divide(sq, counts, out=np.zeros(NUM_FLARE_IDS), where=counts > 0))
    per_label = {}
    for lab in LABELS[1:]:
        n = int(counts[lab.id])
        per_label[lab.name] = {"id": lab.id, "voxels": n, "volume_ml": round(n * vml, 3),
                               "hu_mean": round(float(means[lab.id]), 2) if n else None,
                               "hu_std": round(float(stds[lab.id]), 2) if n else None}
    return {"voxel_volume_ml": vml, "shape": list(labels.shape), "labels": per_label, "tumors": _tumors(labels, vml)}


def _chunks(n: int, size: int = 1 << 22) -> list[slice]:
    """Slices of at most ``size`` voxels: float64 temporaries stay at ~32 MB for any image size."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _tumors(labels: np.ndarray, vml: float) -> dict[str, Any]:
    from flare.runtime.ops.components import components

    mask = labels == TUMOR
    if not mask.any():
        return {"count": 0, "volumes_ml": []}
    _, counts = components(mask)
    sizes = sorted((int(c) for c in counts[1:] if c), reverse=True)
    return {"count": len(sizes), "volumes_ml": [round(c * vml, 3) for c in sizes]}

