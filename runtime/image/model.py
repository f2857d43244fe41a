"""The image model of the runtime: :class:`LoadedImage` (a validated 3-D volume and what is needed to write results
back in its space), :class:`DicomSource` (the series a DICOM image came from, for DICOM-SEG), :func:`from_array`
(an in-memory array as an image) and the reorientation to the closest canonical RAS grid and back
(:class:`Reorientation`, :func:`to_canonical`). The readers (:mod:`.nifti`, :mod:`.dicom`) build these; the pipeline
and the writers use them. nibabel is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flare.runtime.foundation.errors import InputError
from flare.runtime.ops.geometry import spacing_from_affine

if TYPE_CHECKING:
    import nibabel as nib
    from pydicom import Dataset

__all__ = ["SUPPORTED_DTYPES", "DicomSource", "LoadedImage", "Reorientation", "check_affine", "from_array",
           "is_oblique", "replace_non_finite", "to_canonical"]

log = logging.getLogger("flare.runtime")

SUPPORTED_DTYPES = tuple(np.dtype(t) for t in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                                               "uint64", "float32", "float64"))

_OBLIQUE_TOL_RAD = 1e-4  # axes within 0.006 degrees of the world axes count as aligned


@dataclass
class LoadedImage:
    """A validated 3-D image and what is needed to write results back in its space."""

    path: Path | None
    data: np.ndarray  # 3-D; native dtype when the header has no scaling, else float32 (scaling applied)
    affine: np.ndarray  # 4x4 float64 (nibabel's img.affine: sform, else qform, else pixdim)
    header: nib.Nifti1Header  # copy of the input header (Nifti1Header or Nifti2Header)
    spacing: tuple[float, float, float]  # header zooms of the 3 spatial axes
    oblique: bool  # affine not axis-aligned
    source: DicomSource | None = None  # the DICOM series it was read from , for DICOM-SEG

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """The axis codes of the affine, e.g. ``"RAS"`` or ``"LPS"`` (nibabel's ``aff2axcodes``)."""
        from nibabel.orientations import aff2axcodes

        return "".join(aff2axcodes(self.affine))


@dataclass(frozen=True)
class DicomSource:
    """What a DICOM-SEG needs to reference the series an image was read from (kept in ``LoadedImage.source``)."""

    series_uid: str
    files: tuple[Path, ...]  # one per slice, in voxel order: files[k] holds data[:, :, k]
    datasets: tuple[Dataset, ...]  # the same slices' headers, without pixel data


def replace_non_finite(path: Path | None, data: np.ndarray) -> np.ndarray:
    """Replace NaN/-inf by the smallest finite value and +inf by the largest (in place), with a warning."""
    if data.dtype.kind != "f":
        return data
    finite = np.isfinite(data)
    if finite.all():
        return data
    if not finite.any():
        raise InputError(path, "no finite voxel values (all NaN or infinite)")
    lo, hi = float(data[finite].min()), float(data[finite].max())
    bad = int(finite.size - np.count_nonzero(finite))
    log.warning("%s: %d non-finite voxels replaced (NaN and -inf by %g, +inf by %g)", path or "array", bad, lo, hi)
    if not data.flags.writeable:
        data = data.copy()
    np.nan_to_num(data, copy=False, nan=lo, posinf=hi, neginf=lo)
    return data


def is_oblique(affine: np.ndarray) -> bool:
    from nibabel.affines import obliquity

    return bool(np.max(np.abs(obliquity(affine))) > _OBLIQUE_TOL_RAD)


def check_affine(path: Path | None, affine: np.ndarray) -> None:
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(path, "the affine (sform/qform) is not a finite 4x4 matrix")
    with np.errstate(all="ignore"):
        det = float(np.linalg.det(affine[:3, :3]))
    if not abs(det) >= 1e-12:
        raise InputError(path, "the affine (sform/qform) is singular")


def from_array(data: np.ndarray, affine: np.ndarray) -> LoadedImage:
    """Wrap an in-memory 3-D array and its voxel-to-world (RAS) affine as a :class:`LoadedImage`.

    The header is a fresh NIfTI-1 header (sform code 2 "aligned", qform code 0, mm units); spacing is the length
    of the affine's columns. Bool arrays become uint8. The array is not copied unless non-finite values must be
    replaced.
    """
    from nibabel.nifti1 import Nifti1Header

    data = np.asarray(data)
    if data.ndim != 3:
        raise InputError(None, f"array is {data.ndim}-D with shape {data.shape}; a 3-D volume is needed")
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
        raise InputError(None, f"unsupported array dtype {data.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    check_affine(None, affine)
    data = replace_non_finite(None, data)
    hdr = Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(affine, code="aligned")
    hdr.set_qform(affine, code="unknown", strip_shears=True)
    spacing = spacing_from_affine(affine)
    hdr.set_zooms(spacing)
    hdr.set_xyzt_units("mm")
    return LoadedImage(None, data, affine, hdr, spacing, is_oblique(affine))


# ------------------------------------------------------------------------------------------------ orientation
@dataclass(frozen=True)
class Reorientation:
    """Flips and a transpose taking an image's voxel grid to the closest canonical RAS grid, and back exactly.

    ``flip`` lists input axes that are reversed; RAS axis ``r`` is input axis ``perm[r]``. Only the first three
    axes are touched (trailing axes, e.g. channels-last, pass through).
    """

    perm: tuple[int, int, int]
    flip: tuple[int, ...]

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> Reorientation:
        from nibabel.orientations import io_orientation

        ornt = io_orientation(affine)  # ornt[input axis] = (RAS axis, +1/-1)
        perm = tuple(int(a) for a in np.argsort(ornt[:, 0]))
        flip = tuple(int(a) for a in range(3) if ornt[a, 1] < 0)
        return cls(perm, flip)  # type: ignore[arg-type]

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not self.flip

    def _axes(self, arr: np.ndarray, perm: tuple[int, ...]) -> tuple[int, ...]:
        if arr.ndim < 3:
            raise ValueError(f"reorientation needs at least 3 axes, got shape {arr.shape}")
        return tuple(perm) + tuple(range(3, arr.ndim))

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """Input grid -> RAS grid (a view)."""
        flipped = np.flip(arr, axis=self.flip) if self.flip else arr
        return flipped.transpose(self._axes(arr, self.perm))

    def undo(self, arr: np.ndarray) -> np.ndarray:
        """RAS grid -> input grid (a view); ``undo(apply(x))`` is ``x`` exactly."""
        inverse = tuple(int(a) for a in np.argsort(self.perm))
        back = arr.transpose(self._axes(arr, inverse))
        return np.flip(back, axis=self.flip) if self.flip else back

    def ras_affine(self, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The affine of the RAS grid: same world point for the same voxel."""
        from nibabel.orientations import inv_ornt_aff

        ornt = np.array([[list(self.perm).index(a), -1.0 if a in self.flip else 1.0] for a in range(3)])
        return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, shape[:3])


def to_canonical(img: LoadedImage) -> tuple[np.ndarray, np.ndarray, Reorientation]:
    """``(data_ras, affine_ras, reorientation)``: the image as views in the closest canonical RAS grid."""
    r = Reorientation.from_affine(img.affine)
    return r.apply(img.data), r.ras_affine(img.affine, img.data.shape), r
