"""Voxel-grid geometry: boxes, crop/uncrop, and the affines of cropped and resampled grids.

Conventions (docs/architecture.md): arrays are indexed ``(i, j, k)`` like nibabel; a :class:`Box` is half-open
(``lo`` inclusive, ``hi`` exclusive) in voxel indices; resampled grids follow the *align centres* convention of
``torch.nn.functional.interpolate(..., align_corners=False)``: the outer voxel **edges** of the input and output
grids coincide, so output voxel ``o`` of an axis resampled from ``n_in`` to ``n_out`` voxels sits at input
coordinate ``(o + 0.5) * n_in / n_out - 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Box",
    "box_from_mask",
    "box_to_finer_grid",
    "crop",
    "cropped_affine",
    "expand_box",
    "resampled_affine",
    "spacing_from_affine",
    "uncrop",
]

Shape = Sequence[int]


@dataclass(frozen=True)
class Box:
    """A half-open voxel box: ``arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]``."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.lo) != 3 or len(self.hi) != 3:
            raise ValueError(f"a Box needs 3 lo and 3 hi values, got {self.lo}, {self.hi}")
        object.__setattr__(self, "lo", tuple(int(v) for v in self.lo))
        object.__setattr__(self, "hi", tuple(int(v) for v in self.hi))
        if any(h < lo for lo, h in zip(self.lo, self.hi)):
            raise ValueError(f"Box hi {self.hi} is below lo {self.lo}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Number of voxels per axis."""
        return (self.hi[0] - self.lo[0], self.hi[1] - self.lo[1], self.hi[2] - self.lo[2])

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """The box as a tuple of slices, for ``arr[box.slices]``."""
        return tuple(slice(lo, hi) for lo, hi in zip(self.lo, self.hi))  # type: ignore[return-value]

    @classmethod
    def full(cls, shape: Shape) -> Box:
        """The box covering a whole array of ``shape``."""
        return cls((0, 0, 0), (int(shape[0]), int(shape[1]), int(shape[2])))


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) per voxel axis: the lengths of the affine's first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def box_from_mask(mask: np.ndarray) -> Box | None:
    """The tightest box holding every nonzero voxel of a 3-D mask; ``None`` when the mask is empty."""
    if mask.ndim != 3:
        raise ValueError(f"box_from_mask needs a 3-D mask, got shape {mask.shape}")
    lo: list[int] = []
    hi: list[int] = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=others))
        if hit.size == 0:
            return None
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return Box((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]))


def expand_box(box: Box, margin_vox: Sequence[int], shape: Shape) -> Box:
    """Widen ``box`` by ``margin_vox`` voxels on both sides of each axis, clipped to ``[0, shape)``."""
    lo = tuple(max(0, box.lo[a] - int(margin_vox[a])) for a in range(3))
    hi = tuple(min(int(shape[a]), box.hi[a] + int(margin_vox[a])) for a in range(3))
    return Box(lo, hi)  # type: ignore[arg-type]


def box_to_finer_grid(box: Box, coarse_shape: Shape, fine_shape: Shape) -> Box:
    """The smallest box of the fine grid that covers the coarse voxels of ``box``.

    Both grids span the same extent with their outer edges aligned (align-centres convention), so coarse voxel
    ``c`` covers fine coordinates ``[c * r, (c + 1) * r)`` with ``r = n_fine / n_coarse``.
    """
    lo: list[int] = []
    hi: list[int] = []
    for a in range(3):
        ratio = int(fine_shape[a]) / int(coarse_shape[a])
        # a tiny tolerance keeps exact multiples (e.g. 3 * 4.0) from rounding one voxel outwards
        lo.append(max(0, math.floor(box.lo[a] * ratio + 1e-9)))
        hi.append(min(int(fine_shape[a]), math.ceil(box.hi[a] * ratio - 1e-9)))
    return Box((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]))


def crop(arr: np.ndarray, box: Box) -> np.ndarray:
    """``arr`` restricted to ``box`` (a view; trailing axes beyond the first three are kept whole)."""
    return arr[box.slices]


def uncrop(arr: np.ndarray, box: Box, full_shape: Shape, fill: float = 0, into: np.ndarray | None = None
           ) -> np.ndarray:
    """Place ``arr`` (shaped like ``box``) into a new array of ``full_shape`` filled with ``fill``, or into ``into``
    (an array or view of that shape that already holds the fill, e.g. a reoriented view of an F-ordered array)."""
    if tuple(arr.shape[:3]) != box.shape:
        raise ValueError(f"uncrop: array shape {arr.shape} does not match box shape {box.shape}")
    shape = tuple(int(n) for n in full_shape[:3]) + tuple(arr.shape[3:])
    if into is not None and tuple(into.shape) != shape:
        raise ValueError(f"uncrop: target shape {into.shape} does not match {shape}")
    out = np.full(shape, fill, dtype=arr.dtype) if into is None else into
    out[box.slices] = arr
    return out


def cropped_affine(affine: np.ndarray, box: Box) -> np.ndarray:
    """The affine of the grid ``arr[box]``: the original affine shifted by ``box.lo`` voxels."""
    shift = np.eye(4)
    shift[:3, 3] = box.lo
    return np.asarray(affine, dtype=np.float64) @ shift


def resampled_affine(affine: np.ndarray, in_shape: Shape, out_shape: Shape) -> np.ndarray:
    """The affine of a grid resampled from ``in_shape`` to ``out_shape`` (align-centres convention).

    Output voxel ``o`` sits at input voxel coordinate ``o * s + (s - 1) / 2`` with ``s = n_in / n_out``.
    """
    scale = np.array([int(i) / int(o) for i, o in zip(in_shape[:3], out_shape[:3])], dtype=np.float64)
    grid = np.eye(4)
    grid[:3, :3] = np.diag(scale)
    grid[:3, 3] = (scale - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ grid
