"""Benchmark cases: FLARE-size CTs built from the real CTs in ``../shared/data``, or any folder of ``.nii.gz``.

The synthetic set (``--cases synthetic``) resamples the real CTs (linear, in their own voxel order, so their
orientation is kept) to FLARE-like spacings and pads them with air (-1024 HU) to 512×512×N:

========== =================================================== ================== ==============
name       made from                                           spacing (mm)       shape
========== =================================================== ================== ==============
flare_n100 ``ts_torso_ct_1p5mm_lps`` (LPS kept)                0.80, 0.80, 2.50   512×512×100
flare_n300 ``ts_body_ct_3mm_int32``                            0.75, 0.75, 1.25   512×512×300
flare_n550 body + abdomen + torso stacked along z (RAS)        0.78, 0.78, 1.25   512×512×550
========== =================================================== ================== ==============

Files are int16 ``.nii.gz``, cached (default ``$XDG_CACHE_HOME/flare/bench-cases``) and rebuilt only when missing.
The anatomy is real but the body is small in a 512² field (the sources have a 180–366 mm field of view).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation.atomic import atomic_path
from flare.runtime.foundation.errors import InputError

AIR_HU = -1024
CASES_VERSION = 1
SOURCES = {
    "torso": "ts_torso_ct_1p5mm_lps.nii.gz",
    "body": "ts_body_ct_3mm_int32.nii.gz",
    "abdomen": "ts_abdomen_ct_3mm.nii.gz",
}


@dataclass(frozen=True)
class CaseSpec:
    """One synthetic case: sources stacked along z (bottom first), target spacing and padded shape."""

    name: str
    sources: tuple[str, ...]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]


SYNTHETIC: tuple[CaseSpec, ...] = (
    CaseSpec("flare_n100", ("torso",), (0.8, 0.8, 2.5), (512, 512, 100)),
    CaseSpec("flare_n300", ("body",), (0.75, 0.75, 1.25), (512, 512, 300)),
    CaseSpec("flare_n550", ("body", "abdomen", "torso"), (0.78, 0.78, 1.25), (512, 512, 550)),
)


def shared_data_dir() -> Path:
    """``$FLARE_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("FLARE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def default_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "flare" / "bench-cases"


def _load(path: Path, canonical: bool) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if not path.is_file():
        raise InputError(path, "real CT for the synthetic benchmark cases is missing (set FLARE_SHARED_DATA)")
    img: Any = nib.load(str(path))
    if canonical:
        img = nib.as_closest_canonical(img)
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _resample(data: np.ndarray, spacing_in: np.ndarray, spacing_out: Sequence[float],
              max_shape: Sequence[int]) -> np.ndarray:
    """Linear resampling (align-centres grid) to ``spacing_out``; output sides capped at ``max_shape``."""
    import torch

    shape = tuple(min(int(m), max(1, round(n * si / so)))
                  for n, si, so, m in zip(data.shape, spacing_in, spacing_out, max_shape))
    x = torch.from_numpy(np.ascontiguousarray(data))[None, None]
    out = torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def _pad_centre(data: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad (or centre-crop) to ``shape`` with air; returns the array and the voxel offset of the source's origin."""
    out = np.full(tuple(shape), AIR_HU, dtype=np.int16)
    offset = np.array([(t - s) // 2 for t, s in zip(shape, data.shape)])
    src = tuple(slice(max(0, -o), max(0, -o) + min(s, t)) for o, s, t in zip(offset, data.shape, shape))
    dst = tuple(slice(max(0, o), max(0, o) + min(s, t)) for o, s, t in zip(offset, data.shape, shape))
    out[dst] = np.clip(np.rint(data[src]), -32768, 32767).astype(np.int16)
    return out, offset


def build_case(spec: CaseSpec, target: Path, data_dir: Path | None = None) -> Path:
    """Write ``spec`` as an int16 ``.nii.gz`` at ``target`` (atomic) and return it."""
    import nibabel as nib

    data_dir = data_dir or shared_data_dir()
    stack = len(spec.sources) > 1
    parts, affine0 = [], None
    for key in spec.sources:
        data, affine = _load(data_dir / SOURCES[key], canonical=stack)
        spacing_in = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        if affine0 is None:
            affine0 = affine
        parts.append(_resample(data, spacing_in, spec.spacing, spec.shape))
    if stack:
        in_plane = tuple(spec.shape[:2])
        slabs = [_pad_centre(p, in_plane + (p.shape[2],))[0] for p in parts]
        volume = np.concatenate(slabs, axis=2).astype(np.float32)
    else:
        volume = parts[0]
    padded, offset = _pad_centre(volume, spec.shape)
    assert affine0 is not None
    direction = affine0[:3, :3] / np.sqrt((affine0[:3, :3] ** 2).sum(axis=0))
    new = np.eye(4)
    new[:3, :3] = direction * np.asarray(spec.spacing)
    new[:3, 3] = affine0[:3, 3] - new[:3, :3] @ offset
    img = nib.Nifti1Image(padded, new)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(new, code=1)
    img.set_sform(new, code=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        nib.save(img, str(tmp))
    return target


def synthetic_cases(cache_dir: Path | None = None, data_dir: Path | None = None,
                    specs: Sequence[CaseSpec] = SYNTHETIC, progress: bool = False) -> list[Path]:
    """Paths of the synthetic cases, built into ``cache_dir`` when missing."""
    cache_dir = Path(cache_dir or default_cache_dir())
    paths = []
    for spec in specs:
        target = cache_dir / f"{spec.name}_v{CASES_VERSION}.nii.gz"
        if not target.is_file():
            if progress:
                from rich.console import Console

                Console(stderr=True).print(f"building benchmark case {target.name} …")
            build_case(spec, target, data_dir)
        paths.append(target)
    return paths


def folder_cases(folder: Path) -> list[Path]:
    """All ``.nii.gz`` / ``.nii`` files of ``folder`` (sorted); an empty or missing folder is an error."""
    if not folder.is_dir():
        raise InputError(folder, "cases folder does not exist (use 'synthetic' or a folder of .nii.gz files)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii.gz", ".nii")))
    if not files:
        raise InputError(folder, "no .nii.gz or .nii files in the cases folder")
    return files


def resolve_cases(cases: str | Path | Sequence[str | Path], cache_dir: Path | None = None,
                  progress: bool = False) -> list[Path]:
    """``"synthetic"``, a folder, a single file, or a list of files -> list of case paths."""
    if isinstance(cases, (list, tuple)):
        paths = [Path(c) for c in cases]
        for p in paths:
            if not p.is_file():
                raise InputError(p, "case file does not exist")
        return paths
    if str(cases) == "synthetic":
        return synthetic_cases(cache_dir, progress=progress)
    path = Path(cases)  # type: ignore[arg-type]
    if path.is_file():
        return [path]
    return folder_cases(path)
