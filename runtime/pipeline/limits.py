"""Resource bounds checked from the header alone, before any voxel array is allocated.

A NIfTI header of a few hundred bytes decides how much memory the pipeline needs: a 16³ image with 150 mm voxels
becomes a 2400³ grid at the model's 1 mm spacing. :func:`pipeline_grids` lists every grid ``flare-run`` will
allocate for an image — the input array (and its float32 copy when the header scales intensities), the canonical
(RAS) copy, the locator grid and its scores and padded tile plan, the crop at the model spacing (worst case: the
whole image, which is what happens when the locator finds nothing), the ensemble accumulator, the padded tile plan,
the label map at the model spacing and the restored label map — and :func:`check_grids` refuses the image with a
one-line :class:`~flare.runtime.foundation.errors.InputError` naming the file and the grid when one exceeds the limits.

Limits (per grid; override with environment variables, sizes accept K/M/G/T suffixes, powers of 1024):

* ``FLARE_MAX_GRID_VOXELS`` (default 1,000,000,000): spatial voxels of any one grid. The largest FLARE-size case
  (512×512×300 at 0.8×0.8×2.5 mm) is about 126 M voxels at 1 mm, so the default leaves 8× headroom.
* ``FLARE_MAX_GRID_BYTES`` (default 16G): bytes of any one array. The largest array is the float32 ensemble
  accumulator, ``channels × voxels × 4`` bytes: about 6.5 GB for that case without a locator crop (2.5× headroom).
* ``FLARE_MAX_EXTENT_MM`` (default 2000): physical extent of the image along each axis (voxels × spacing). No CT
  scanner images a body 2 m wide; a 16³ header with 150 mm voxels (2.4 m) is refused whatever the bundle's grid.
* ``FLARE_MAX_VOXELS_PER_BYTE`` (default 256): voxels of the largest grid per byte of the input file(s) (the NIfTI
  file, the DICOM series' files, a server request's body), above a floor of 2**25 voxels (a 320³ grid) that any
  file may use. Real CTs need under 10 (a gzip'ed int16 CT holds about 1 voxel per byte; resampling thick slices to
  1 mm adds a few times that); a 0.5 MB file that decompresses to 800³ voxels, or a 2 MB DICOM series whose
  compressed pixel data declares 24576×24576 slices, is refused before a voxel is decoded. This bounds the work and
  memory a small file can buy (decompression bombs of any codec included).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flare.runtime.foundation.errors import FlareError, InputError

if TYPE_CHECKING:
    from flare.runtime.bundle.manifest import Bundle

__all__ = ["DEFAULT_MAX_GRID_BYTES", "DEFAULT_MAX_GRID_VOXELS", "Grid", "Limits", "check_grids", "check_source",
           "pipeline_grids", "preflight", "ras_geometry"]

DEFAULT_MAX_GRID_VOXELS = 1_000_000_000
DEFAULT_MAX_GRID_BYTES = 16 * 2**30
ENV_VOXELS = "FLARE_MAX_GRID_VOXELS"
ENV_BYTES = "FLARE_MAX_GRID_BYTES"
ENV_EXTENT = "FLARE_MAX_EXTENT_MM"
ENV_PER_BYTE = "FLARE_MAX_VOXELS_PER_BYTE"
DEFAULT_MAX_EXTENT_MM = 2000.0
DEFAULT_MAX_VOXELS_PER_BYTE = 256
FREE_VOXELS = 2**25
"""Grids up to this many voxels are allowed whatever the file size (small test images, phantoms)."""
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class LimitError(FlareError):
    """A limit setting (environment variable or option) is not understood."""


def parse_size(text: str, name: str) -> int:
    """``"123"``, ``"512M"``, ``"32G"`` (optionally with ``B``/``iB``) → a positive integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    value = float(m.group(1)) * _UNITS[m.group(2).upper()] if m else 0.0
    if not m or not 1 <= value < 2**63:
        raise LimitError(None, f"{name}={text!r} is not a positive size (e.g. 1000000000, 512M, 32G)")
    return int(value)


@dataclass(frozen=True)
class Limits:
    """Per-grid bounds: spatial voxels and bytes of one array."""

    max_grid_voxels: int = DEFAULT_MAX_GRID_VOXELS
    max_grid_bytes: int = DEFAULT_MAX_GRID_BYTES
    max_extent_mm: float = DEFAULT_MAX_EXTENT_MM
    max_voxels_per_byte: int = DEFAULT_MAX_VOXELS_PER_BYTE

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        env = os.environ if environ is None else environ
        voxels = env.get(ENV_VOXELS)
        nbytes = env.get(ENV_BYTES)
        extent = env.get(ENV_EXTENT)
        per_byte = env.get(ENV_PER_BYTE)
        return cls(parse_size(voxels, ENV_VOXELS) if voxels else DEFAULT_MAX_GRID_VOXELS,
                   parse_size(nbytes, ENV_BYTES) if nbytes else DEFAULT_MAX_GRID_BYTES,
                   float(parse_size(extent, ENV_EXTENT)) if extent else DEFAULT_MAX_EXTENT_MM,
                   parse_size(per_byte, ENV_PER_BYTE) if per_byte else DEFAULT_MAX_VOXELS_PER_BYTE)


@dataclass(frozen=True)
class Grid:
    """One array the pipeline allocates: ``channels × shape`` elements of ``itemsize`` bytes."""

    name: str
    shape: tuple[int, int, int]
    itemsize: int
    channels: int = 1

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.voxels * self.channels * self.itemsize

    def describe(self) -> str:
        dims = "x".join(_count(s) for s in self.shape)
        return f"{self.channels} channels x {dims}" if self.channels > 1 else dims


def ras_geometry(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and spacing of the canonical (RAS) grid of an image, from its shape and a finite, invertible affine."""
    from flare.runtime.image.model import Reorientation

    perm = Reorientation.from_affine(np.asarray(affine, dtype=np.float64)).perm
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (tuple(int(shape[p]) for p in perm),  # type: ignore[return-value]
            tuple(float(norms[p]) for p in perm))  # type: ignore[return-value]


def _resampled(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """``output_shape`` of :mod:`flare.runtime.ops.resample` in exact integer-safe arithmetic (no overflow)."""
    out = []
    for n, si, so in zip(shape, spacing, target):
        ratio = float(si) / float(so)
        out.append(max(1, round(n * ratio)) if math.isfinite(ratio) else 2**63)
    return out[0], out[1], out[2]


def _padded(shape: tuple[int, int, int], roi: Sequence[int], divisor: int) -> tuple[int, int, int]:
    """Shape after the tile plan's zero padding (tiles never larger than ``ceil_to(size, divisor)``)."""
    from flare.runtime.inference.tiling import effective_roi

    eff = effective_roi(shape, tuple(int(r) for r in roi), divisor)
    return max(shape[0], eff[0]), max(shape[1], eff[1]), max(shape[2], eff[2])


def pipeline_grids(shape: Sequence[int], affine: np.ndarray, itemsize: int, scaled: bool,
                   bundle: Bundle) -> list[Grid]:
    """Every grid ``flare-run`` allocates for an image of ``shape``/``affine``/``itemsize`` with ``bundle``."""
    ras_shape, spacing = ras_geometry(shape, affine)
    grids = [Grid("input", ras_shape, itemsize)]
    if scaled:
        grids.append(Grid("scaled input (float32)", ras_shape, 4))
    grids.append(Grid("canonical copy", ras_shape, 4 if scaled else itemsize))
    if bundle.locator is not None:
        coarse = _resampled(ras_shape, spacing, bundle.locator_spacing_mm)
        div = bundle.locator.spatial_divisor
        grids += [Grid("locator grid", coarse, 4),
                  Grid("locator scores", coarse, 4, bundle.locator.out_channels),
                  Grid("locator tile plan (padded)", _padded(coarse, bundle.locator_roi, div), 4)]
    fold = bundle.folds[0]
    model = _resampled(ras_shape, spacing, bundle.spacing_mm)  # crop worst case: the whole image
    grids += [Grid("crop at the model spacing", model, 4),
              Grid("ensemble accumulator", model, 4, fold.out_channels),
              Grid("tile plan (padded)", _padded(model, bundle.roi, fold.spatial_divisor), 4),
              Grid("labels at the model spacing", model, 1),
              Grid("output labels", ras_shape, 1)]
    return grids


def preflight(image: str | Path, bundle_dir: str | Path, limits: Limits | None = None, *, kind: str = "nifti",
              series_uid: str | None = None) -> None:
    """Refuse ``image`` (a NIfTI file, or with ``kind="dicom"`` a DICOM series) from its header(s) alone, before any
    model is loaded: the header checks of the reader and every limit for ``bundle_dir`` (its bundle.json only; the
    model files are checked when they are loaded)."""
    from flare.runtime.bundle.manifest import load_bundle

    bundle = load_bundle(bundle_dir, verify_hashes=False)
    limits = limits or Limits.from_env()

    def grids(path: Path, shape: tuple[int, int, int], affine: np.ndarray, itemsize: int, scaled: bool,
              source_bytes: int | None = None) -> None:
        check_grids(path, pipeline_grids(shape, affine, itemsize, scaled, bundle), limits,
                    affine=affine, source_bytes=source_bytes)

    if kind == "dicom":
        from flare.runtime.image.dicom import check_dicom_header

        check_dicom_header(image, series_uid, preflight=grids)
    else:
        from flare.runtime.image.nifti import check_header

        check_header(image, preflight=grids)


def check_source(path: Path | None, shape: tuple[int, int, int], affine: np.ndarray, itemsize: int, scaled: bool,
                 source_bytes: int | None = None, limits: Limits | None = None) -> None:
    """The limits that need no bundle (the input grids, physical extent, voxels per file byte): what a client that
    sends images to a server checks before decoding them."""
    ras_shape, _ = ras_geometry(shape, affine)
    grids = [Grid("input", ras_shape, itemsize)] + ([Grid("scaled input (float32)", ras_shape, 4)] if scaled else [])
    check_grids(path, grids, limits, affine=affine, source_bytes=source_bytes)


def check_grids(path: str | Path | None, grids: Sequence[Grid], limits: Limits | None = None, *,
                affine: np.ndarray | None = None, source_bytes: int | None = None) -> None:
    """Raise a one-line ``InputError`` naming ``path`` and the first grid over the limits; with ``affine``, the
    physical extent of the image (the first grid) too; with ``source_bytes`` (the input's size in bytes), the voxels
    of the largest grid per byte."""
    limits = limits or Limits.from_env()
    for g in grids:
        if g.voxels > limits.max_grid_voxels:
            raise InputError(path, f"the {g.name} would be {g.describe()} = {_count(g.voxels)} voxels, more than "
                                   f"the limit of {_count(limits.max_grid_voxels)} ({ENV_VOXELS}); "
                                   "check the voxel spacing and dimensions in the header")
        if g.nbytes > limits.max_grid_bytes:
            raise InputError(path, f"the {g.name} would be {g.describe()} = {_human(g.nbytes)}, more than "
                                   f"the limit of {_human(limits.max_grid_bytes)} ({ENV_BYTES}); "
                                   "check the voxel spacing and dimensions in the header")
    if affine is not None and grids:
        _, spacing = ras_geometry(grids[0].shape, affine)
        extent = [n * s for n, s in zip(grids[0].shape, spacing)]
        if max(extent) > limits.max_extent_mm:
            dims = " x ".join(f"{e:.0f}" for e in extent)
            raise InputError(path, f"the image would be {dims} mm, more than the limit of {limits.max_extent_mm:.0f} "
                                   f"mm per axis ({ENV_EXTENT}); check the voxel spacing in the header")
    if source_bytes is not None and grids:
        largest = max(grids, key=lambda g: g.voxels)
        allowed = max(FREE_VOXELS, limits.max_voxels_per_byte * max(int(source_bytes), 1))
        if largest.voxels > allowed:
            raise InputError(path, f"the {largest.name} would be {largest.describe()} = {_count(largest.voxels)} "
                                   f"voxels from {_human(int(source_bytes))} of input, more than "
                                   f"{limits.max_voxels_per_byte} voxels per byte ({ENV_PER_BYTE}); a real CT "
                                   "needs far fewer (corrupt header or a decompression bomb?)")


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**12 else f"{float(n):.3g}"


def _human(n: int) -> str:
    if n >= 2**50:
        return f"{float(n):.3g} bytes"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
