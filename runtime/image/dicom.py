"""Reading DICOM CT series into a :class:`~flare.runtime.image.nifti.LoadedImage` (the ``dicom`` extra: pydicom + highdicom).

Library choice: **highdicom** (with pydicom, which it is built on). Its volume API
(:func:`highdicom.spatial.get_series_volume_positions`, :class:`highdicom.VolumeGeometry`) orders single-frame
slices by their position along the slice normal (never by file name or InstanceNumber), refuses duplicate
positions, irregular spacing and non-perpendicular stacking, and gives the voxel-to-patient affine from
ImagePositionPatient / ImageOrientationPatient / PixelSpacing, converted to NIfTI's RAS convention by
``get_affine("RAH")``. highdicom is needed anyway to write DICOM-SEG (:mod:`flare.runtime.image.dicomseg`), so DICOM
support costs one extra. dicom2nifti and dcm2niix were considered: both convert to a NIfTI file on disk (a temporary
file and, for dcm2niix, a subprocess with its own output naming), and neither keeps the source datasets that a
DICOM-SEG must reference; dcm2niix's silent gantry-tilt resampling would also put the labels on a grid that is not the
source series'.

Reading is defensive, in the style of :func:`flare.runtime.image.nifti.read_image`: every file's header is parsed without its
pixel data and checked before the voxel array is allocated; each problem is one :class:`InputError` naming the file.
Checks, in order: the path exists; DICOM files are found (a 'DICM' preamble, or a dataset that parses); a corrupt
file is named; series are grouped by SeriesInstanceUID (several CT series and no ``series_uid``: an error listing
them); modality CT; an image (Rows/Columns) with one sample per pixel, single-frame; ImagePositionPatient,
ImageOrientationPatient, PixelSpacing present, finite, the same orientation/spacing/size/frame of reference in every
slice; at least 2 slices; voxels <= ``max_voxels``; no duplicate positions; no gantry tilt (slices must be stacked
along their normal: a sideways drift of more than a quarter pixel over the stack is refused); regular spacing (a gap
that is a multiple of the spacing is reported as missing slices). Gantry tilt and uneven gaps are refused rather than
resampled, so that the labels stay on the source series' grid (which a DICOM-SEG must reference).

Voxel values: RescaleSlope/RescaleIntercept are applied per slice, slope 1 and intercept 0 when absent (an
intercept alone still applies); a slope of 0, a non-numeric or a non-finite value is refused from the headers, naming
the file, before any pixel is decoded. A Modality LUT Sequence without rescale values is applied with pydicom's
``apply_modality_lut``. As for NIfTI scaling, data is float32 when any slice has a rescale other than slope 1 /
intercept 0, else it keeps the stored integer dtype. The data is in voxel order (column, row, slice) with slices in
increasing position along the normal, Fortran-contiguous like nibabel's.

Headers are read without pixel data and without any element over 64 KiB (pydicom's ``defer_size``: the value is
never read); private elements and sequences are dropped, so ``DicomSource.datasets`` holds only small standard
attributes whatever the files carry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flare.runtime.foundation.errors import InputError
from flare.runtime.foundation.files import walk
from flare.runtime.foundation.lazy import lazy_import
from flare.runtime.image.model import DicomSource, LoadedImage, from_array

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = ["DicomSource", "SeriesInfo", "check_dicom_header", "find_series", "is_dicom_file", "read_dicom"]

log = logging.getLogger("flare.runtime")

_PREAMBLE = 128
_ORIENTATION_TOL = 1e-4  # direction cosines equal across slices within this
_SPACING_TOL = 1e-4  # relative: PixelSpacing equal across slices
_TILT_TOL_PIXELS = 0.25  # sideways drift of the slice stack allowed, in pixels (gantry tilt above it is refused)
_GAP_RTOL = 1e-2  # relative slice spacing regularity (highdicom's default)
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_MODALITY_LUT_TAG = 0x00283000
MAX_INFLATED_BYTES = 64 * 2**20
"""A deflated DICOM file may inflate to at most this (a 4096×4096 slice of 32-bit pixels)."""
_DEFER_BYTES = 64 * 2**10
"""Header elements larger than this are not read (pydicom's ``defer_size``): a 100 MB private element costs nothing."""


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found on disk."""

    uid: str  # SeriesInstanceUID
    description: str  # SeriesDescription ('' when absent)
    modality: str  # Modality ('' when absent)
    n_instances: int  # number of files (instances) of the series
    folder: Path  # the deepest folder holding all of its files


#: imported on first use (the ``dicom`` extra); a missing one is a one-line DependencyError naming the extra
pydicom_mod = lazy_import("pydicom", "dicom")
highdicom_mod = lazy_import("highdicom", "dicom")


# ------------------------------------------------------------------------------------------------ finding files
def is_dicom_file(path: Path) -> bool:
    """True for a DICOM file: the 'DICM' magic after the 128-byte preamble, or (files written without the
    preamble) a dataset that pydicom parses and that has a SOPClassUID. Only regular files are opened (``os.stat``
    first: a FIFO would block forever)."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE + 4)
    except OSError:
        return False
    if head[_PREAMBLE:_PREAMBLE + 4] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in (b"\x08\x00", b"\x02\x00"):  # no preamble: must start with group 8 or 2
        return False
    if not pydicom_mod.available():  # looks like a dataset; reading it will name the extra to install
        return True
    try:
        with _quiet():
            ds = pydicom_mod.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID"],
                                     defer_size=_DEFER_BYTES)
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is not a DICOM file
        return False
    return "SOPClassUID" in ds


def _dicom_files(folder: Path) -> list[Path]:
    """DICOM files under ``folder`` (recursive, hidden files and folders skipped), sorted by path. Special files
    (FIFO, device, socket) are never opened (a warning names them); an unreadable file or folder is an InputError."""
    found = walk(folder)
    if found.unreadable:
        first = found.unreadable[0]
        raise InputError(first.path, first.problem)
    for special in found.special:
        log.warning("%s", special)
    return [f for f in found.files if is_dicom_file(f)]


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom's warnings about invalid values (printed with a site-packages path) are silenced: flare checks the
    values it uses itself and names the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read_header(path: Path) -> Dataset:
    """A file's dataset without pixel data, private elements or large elements (only what flare uses is kept);
    a corrupt file is one InputError."""
    pydicom = pydicom_mod.load()
    try:
        with _quiet():
            _check_deflated(path)
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, defer_size=_DEFER_BYTES)
            slim = _slim(path, ds)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise InputError(path, f"corrupt DICOM file ({_first_line(err)})")
    if not _sop_class(slim):  # pydicom reads a damaged file into an empty or truncated dataset without complaint
        raise InputError(path, "corrupt DICOM file (no SOP Class UID)")
    return slim


def _check_deflated(path: Path) -> None:
    """A Deflated Explicit VR Little Endian file (the whole dataset, pixels included, is one deflate stream) that
    inflates to more than :data:`MAX_INFLATED_BYTES` is refused: pydicom inflates the whole file in memory even to
    read its header. The check inflates in 1 MiB pieces and keeps none of them."""
    import zlib

    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    with open(path, "rb") as f:
        if f.read(_PREAMBLE + 4)[_PREAMBLE:] != b"DICM":
            return
    with _quiet():
        meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as f:
        f.seek(_PREAMBLE + 4)
        _skip_meta(f)
        while chunk := inflate.unconsumed_tail or f.read(2**20):
            total += len(inflate.decompress(chunk, 2**20))
            if total > MAX_INFLATED_BYTES:
                raise InputError(path, f"the deflated dataset inflates to more than {MAX_INFLATED_BYTES} bytes "
                                       f"from {os.stat(path).st_size} (a decompression bomb?)")
            if inflate.eof:
                break


def _skip_meta(f: Any) -> None:
    """Move ``f`` (after 'DICM') past the file meta group (group 0002, explicit VR little endian)."""
    while True:
        pos = f.tell()
        head = f.read(8)
        if len(head) < 8 or int.from_bytes(head[:2], "little") != 2:
            f.seek(pos)
            return
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = int.from_bytes(f.read(4), "little")
        else:
            length = int.from_bytes(head[6:8], "little")
        f.seek(length, 1)


def _slim(path: Path, ds: Dataset) -> Dataset:
    """A copy of ``ds`` without private elements, sequences and elements over the size limit (their values were
    never read), so that a series' headers kept for a DICOM-SEG stay small whatever the files carry."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset

    out = DicomDataset()
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)  # the raw element: a deferred value is not read
        if tag.is_private or tag.group == 0x7FE0:
            continue
        if getattr(raw, "VR", None) == "SQ" and tag != _MODALITY_LUT_TAG:
            continue
        length = getattr(raw, "length", 0) or 0
        if getattr(raw, "value", b"") is None or length > _DEFER_BYTES:
            continue  # deferred: larger than the limit
        out[tag] = ds[tag]
    out.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    out.preamble = getattr(ds, "preamble", None)
    implicit, little = ds.original_encoding
    out.set_original_encoding(implicit, little, ds.original_character_set)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _scan(path: Path) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers of the DICOM files under a folder, grouped by SeriesInstanceUID (DICOMDIR files are skipped)."""
    files = _dicom_files(path)
    if not files:
        raise InputError(path, "no DICOM files found in this folder")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for file in files:
        ds = _read_header(file)
        if _is_dicomdir(ds):
            continue
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise InputError(file, "DICOM file without a SeriesInstanceUID (not part of an image series)")
        series.setdefault(str(uid), []).append((file, ds))
    if not series:
        raise InputError(path, "no DICOM series found in this folder (only a DICOMDIR)")
    return series


def _sop_class(ds: Dataset) -> str:
    """The SOP Class UID of a dataset, or of its file meta information (a DICOMDIR has it only there)."""
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return str(sop or "")


def _is_dicomdir(ds: Dataset) -> bool:
    return _sop_class(ds) == _DICOMDIR_SOP


def _info(uid: str, members: list[tuple[Path, Dataset]]) -> SeriesInfo:
    first = members[0][1]
    folder = Path(os.path.commonpath([str(f.parent) for f, _ in members]))
    return SeriesInfo(uid, str(first.get("SeriesDescription", "") or ""), str(first.get("Modality", "") or ""),
                      len(members), folder)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "does not exist")


def _groups(path: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], Dataset | None]:
    """The series under a folder; for one file, the series of its folder and the file's own header (a DICOMDIR
    stands for its folder)."""
    _check_exists(path)
    if path.is_dir():
        return _scan(path), None
    if not is_dicom_file(path):
        raise InputError(path, "not a DICOM file")
    ds = _read_header(path)
    if _is_dicomdir(ds):
        return _scan(path.parent), None
    if not ds.get("SeriesInstanceUID"):
        raise InputError(path, "DICOM file without a SeriesInstanceUID")
    return _scan(path.parent), ds


def find_series(path: str | Path) -> list[SeriesInfo]:
    """The DICOM series in a folder (searched recursively) or the series of one DICOM file (found in its folder),
    ordered by folder then description. Every series is listed, whatever its modality (filter on ``modality``)."""
    groups, own = _groups(Path(path))
    if own is not None:
        groups = {str(own.SeriesInstanceUID): groups[str(own.SeriesInstanceUID)]}
    return sorted((_info(uid, members) for uid, members in groups.items()),
                  key=lambda s: (str(s.folder), s.description, s.uid))


def _describe(infos: Sequence[SeriesInfo]) -> str:
    return "; ".join(f"{s.uid} ({s.modality or '?'} '{s.description}', {s.n_instances} files)" for s in infos)


def _pick_series(path: Path, groups: dict[str, list[tuple[Path, Dataset]]],
                 series_uid: str | None) -> tuple[str, list[tuple[Path, Dataset]]]:
    infos = sorted((_info(uid, m) for uid, m in groups.items()), key=lambda s: (str(s.folder), s.uid))
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(path, f"no series {series_uid} here; found: {_describe(infos)}")
        return series_uid, groups[series_uid]
    if len(groups) == 1:
        uid = next(iter(groups))
        return uid, groups[uid]
    ct = [s for s in infos if s.modality == "CT"]
    if len(ct) == 1:  # e.g. a CT series beside a DICOM-SEG or a report: the CT is meant
        log.info("%s: using CT series %s; ignoring %d other series", path, ct[0].uid, len(infos) - 1)
        return ct[0].uid, groups[ct[0].uid]
    raise InputError(path, f"{len(infos)} series found, pick one with --series UID: {_describe(infos)}")


# ------------------------------------------------------------------------------------------------ checks
def _floats(ds: Dataset, keyword: str, n: int, file: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise InputError(file, f"no {keyword} (needed for the slice geometry)")
    try:
        arr = np.array([float(v) for v in (value if isinstance(value, Sequence) else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(file, f"invalid {keyword} {value!r}")
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(file, f"invalid {keyword} {value!r} ({n} finite numbers expected)")
    return arr


def _check_image(file: Path, ds: Dataset) -> None:
    """One slice: a single-frame, one-sample CT image."""
    modality = str(ds.get("Modality", "") or "")
    if "Rows" not in ds or "Columns" not in ds:
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise InputError(file, f"not an image ({kind}, modality {modality or 'unknown'})")
    if modality != "CT":
        raise InputError(file, f"modality is {modality or 'missing'}, not CT; flare segments CT images only")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(file, f"multi-frame image ({ds.NumberOfFrames} frames); only series of single-frame CT "
                               "images are supported")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(file, f"{ds.SamplesPerPixel} samples per pixel; a greyscale CT image is needed")


def _check_series(members: list[tuple[Path, Dataset]], max_voxels: int) -> tuple[int, int, np.ndarray]:
    """Checks that need all slices' headers; returns rows, columns and the (row, column) direction cosines."""
    for file, ds in members:
        _check_image(file, ds)
    file0, ds0 = members[0]
    size0 = (int(ds0.Rows), int(ds0.Columns))
    iop0 = _floats(ds0, "ImageOrientationPatient", 6, file0)
    ps0 = _floats(ds0, "PixelSpacing", 2, file0)
    frame0 = ds0.get("FrameOfReferenceUID")
    row, col = iop0[:3], iop0[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(float(row @ col)) > 1e-3):
        raise InputError(file0, f"invalid ImageOrientationPatient {tuple(iop0)} (not two orthogonal unit vectors)")
    if not np.all(ps0 > 0):
        raise InputError(file0, f"invalid PixelSpacing {tuple(ps0)} (must be > 0)")
    for file, ds in members:
        size = (int(ds.Rows), int(ds.Columns))
        if size != size0:
            raise InputError(file, f"mixed image sizes in the series: {size[0]}x{size[1]} here, "
                                   f"{size0[0]}x{size0[1]} in {file0.name}")
        _floats(ds, "ImagePositionPatient", 3, file)
        iop = _floats(ds, "ImageOrientationPatient", 6, file)
        if np.max(np.abs(iop - iop0)) > _ORIENTATION_TOL:
            raise InputError(file, f"slice orientation {tuple(iop)} differs from {tuple(iop0)} in {file0.name}")
        ps = _floats(ds, "PixelSpacing", 2, file)
        if np.max(np.abs(ps - ps0)) > _SPACING_TOL * float(ps0.max()):
            raise InputError(file, f"pixel spacing {tuple(ps)} differs from {tuple(ps0)} in {file0.name}")
        if ds.get("FrameOfReferenceUID") != frame0:
            raise InputError(file, f"frame of reference differs from the one in {file0.name}")
    n = len(members)
    if n < 2:
        raise InputError(file0, "the series has a single slice; a 3-D CT series is needed")
    if n * size0[0] * size0[1] > max_voxels:
        raise InputError(file0, f"the series has {n} slices of {size0[0]}x{size0[1]}, more voxels than the limit "
                                f"of {max_voxels}")
    return size0[0], size0[1], iop0


def _check_stack(path: Path, members: list[tuple[Path, Dataset]], iop: np.ndarray) -> None:
    """Duplicate positions and gantry tilt, with messages naming the slices (before highdicom's regularity check)."""
    files = [f for f, _ in members]
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in members])
    normal = np.cross(iop[:3], iop[3:])
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    step = np.diff(dist[order])
    tiny = 1e-3 * max(float(np.median(np.abs(step))), 1e-3)
    if np.any(np.abs(step) <= tiny):
        k = int(np.argmax(np.abs(step) <= tiny))
        a, b = files[order[k]], files[order[k + 1]]
        raise InputError(path, f"two slices at the same position {tuple(np.round(pos[order[k]], 3))}: "
                               f"{a.name} and {b.name} (duplicate or overlapping acquisitions)")
    # sideways drift of each slice relative to the first, in the slice plane (a gantry tilt shears the stack)
    drift = pos - pos[order[0]]
    drift -= np.outer(drift @ normal, normal)
    worst = int(np.argmax(np.linalg.norm(drift, axis=1)))
    shift = float(np.linalg.norm(drift[worst]))
    pixel = float(min(float(v) for v in members[0][1].PixelSpacing))
    if shift > _TILT_TOL_PIXELS * pixel:
        along = abs(float(dist[worst] - dist[order[0]]))
        angle = math.degrees(math.atan2(shift, along))
        raise InputError(path, f"gantry tilt: the slices are not stacked along their normal ({angle:.2f} degrees, "
                               f"{shift:.2f} mm sideways over {along:.1f} mm); tilted series are not supported, "
                               "resample it to an untilted volume first (e.g. with dcm2niix)")


def _diagnose_gaps(path: Path, members: list[tuple[Path, Dataset]], iop: np.ndarray) -> InputError:
    """Why highdicom found no regular spacing: missing slices or uneven gaps."""
    files = [f for f, _ in members]
    dist = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in members]) @ np.cross(iop[:3], iop[3:])
    order = np.argsort(dist)
    step = np.diff(dist[order])
    spacing = float(np.median(step))
    worst = int(np.argmax(np.abs(step - spacing)))
    ratio = float(step[worst]) / spacing
    a, b = files[order[worst]].name, files[order[worst + 1]].name
    if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
        return InputError(path, f"missing slice(s): a gap of {step[worst]:.3g} mm between {a} and {b} where the "
                                f"spacing is {spacing:.3g} mm ({round(ratio) - 1} slice(s) missing)")
    return InputError(path, f"uneven slice spacing from {float(step.min()):.3g} to {float(step.max()):.3g} mm "
                            f"(e.g. {step[worst]:.3g} mm between {a} and {b}); a regularly spaced series is needed")


# ------------------------------------------------------------------------------------------------ reading
def _volume_order(path: Path, members: list[tuple[Path, Dataset]], iop: np.ndarray) -> tuple[list[int], float]:
    """Indices of ``members`` in volume order (increasing position along the normal) and the slice spacing."""
    hd = highdicom_mod.load()
    _check_stack(path, members, iop)
    spacing, positions = hd.spatial.get_series_volume_positions(
        [ds for _, ds in members], rtol=_GAP_RTOL, orientation_tol=_ORIENTATION_TOL)
    if spacing is None or positions is None:
        raise _diagnose_gaps(path, members, iop)
    order = [0] * len(members)
    for i, k in enumerate(positions):
        order[k] = i
    return order, float(spacing)


def _affine_ras(members: list[tuple[Path, Dataset]], rows: int, columns: int, iop: np.ndarray,
                spacing: float) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS world affine, from highdicom's geometry of the ordered slices."""
    hd = highdicom_mod.load()
    first = members[0][1]
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=[float(v) for v in first.ImagePositionPatient], image_orientation=[float(v) for v in iop],
        rows=rows, columns=columns, pixel_spacing=[float(v) for v in first.PixelSpacing],
        spacing_between_slices=spacing, number_of_frames=len(members), coordinate_system="PATIENT")
    # highdicom indexes (slice, row, column) in LPS; NIfTI's data is (column, row, slice) in RAS
    return np.asarray(geometry.permute_spatial_axes([2, 1, 0]).get_affine("RAH"), dtype=np.float64)


Rescale = tuple[float, float] | None
"""A slice's modality transform: ``(slope, intercept)``, or None for a Modality LUT Sequence (applied by pydicom)."""


def _rescale_value(file: Path, ds: Dataset, keyword: str, default: float) -> float:
    raw = ds.get(keyword)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InputError(file, f"{keyword} {str(raw)[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(file, f"{keyword} {str(raw)[:40]!r} is not a finite number")
    return value


def _rescale(file: Path, ds: Dataset) -> Rescale:
    """The modality LUT of one slice, checked: RescaleSlope defaults to 1 and RescaleIntercept to 0 when absent
    (an intercept alone still applies); a slope of 0 is refused (it would make every voxel the intercept; unlike
    NIfTI's ``scl_slope``, DICOM gives 0 no meaning); non-numeric or non-finite values are refused."""
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        return None
    slope = _rescale_value(file, ds, "RescaleSlope", 1.0)
    intercept = _rescale_value(file, ds, "RescaleIntercept", 0.0)
    if slope == 0.0:
        raise InputError(file, "RescaleSlope is 0: every voxel would become the intercept (a slope of 0 has no "
                               "meaning in DICOM); fix the series' RescaleSlope")
    return slope, intercept


def _set_transfer_syntax(ds: Dataset) -> None:
    """A dataset stored without file meta information (no preamble): record the encoding pydicom read it with, which
    pixel decoding needs."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _read_pixels(members: list[tuple[Path, Dataset]], rows: int, columns: int,
                 rescale: list[Rescale]) -> np.ndarray:
    """The ordered slices' modality values in one freshly allocated (slice, row, column) array."""
    pydicom = pydicom_mod.load()
    from pydicom.pixels import apply_modality_lut

    scaled = any(r != (1.0, 0.0) for r in rescale)
    volume: np.ndarray | None = None
    for k, (file, _) in enumerate(members):
        try:
            with _quiet():
                _check_deflated(file)
                ds = pydicom.dcmread(file, force=True, defer_size=_DEFER_BYTES)
                _set_transfer_syntax(ds)
                pixels = ds.pixel_array
        except Exception as err:  # noqa: BLE001 - decoding errors (truncated data, missing codec) come as many types
            raise InputError(file, f"cannot decode the pixel data ({_first_line(err)})")
        if pixels.shape != (rows, columns):
            raise InputError(file, f"pixel data of shape {pixels.shape}, expected {rows}x{columns}")
        if volume is None:
            dtype = np.float32 if scaled else pixels.dtype.newbyteorder("=")
            try:
                volume = np.empty((len(members), rows, columns), dtype=dtype)
            except MemoryError:
                raise InputError(file, f"not enough memory for {len(members)} slices of {rows}x{columns}")
        r = rescale[k]
        if r is None:
            try:
                with _quiet():
                    volume[k] = apply_modality_lut(pixels, ds)
            except Exception as err:  # noqa: BLE001 - a damaged Modality LUT (short LUTData, bad descriptor)
                raise InputError(file, f"cannot apply the Modality LUT ({_first_line(err)})") from None
        elif scaled:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not printed
                np.multiply(pixels, np.float32(r[0]), out=volume[k], dtype=np.float32)
                volume[k] += np.float32(r[1])
            if np.isinf(volume[k]).any():
                raise InputError(file, f"RescaleSlope {r[0]:g} and RescaleIntercept {r[1]:g} take pixel values beyond "
                                       "float32 (corrupt header?)")
        else:
            volume[k] = pixels
        del ds, pixels
    assert volume is not None
    return volume


Preflight = Callable[..., None]
"""``preflight(path, shape, affine, itemsize, scaled, source_bytes)`` as for :func:`flare.runtime.image.nifti.read_image`:
called after the header checks, before any pixel is decoded; raises to refuse."""


@dataclass(frozen=True)
class _Series:
    """A series checked from its headers alone, in volume order."""

    uid: str
    members: list[tuple[Path, Dataset]]
    rows: int
    columns: int
    affine: np.ndarray
    rescale: list[Rescale]
    itemsize: int  # bytes per voxel of the array that will be allocated
    source_bytes: int  # total size of the series' files


def _checked_series(path: Path, series_uid: str | None, max_voxels: int, preflight: Preflight | None) -> _Series:
    """Every check that needs only the headers, then ``preflight``."""
    groups, own = _groups(path)
    if own is not None:
        if series_uid is not None and series_uid != own.SeriesInstanceUID:
            raise InputError(path, f"belongs to series {own.SeriesInstanceUID}, not {series_uid}")
        _check_image(path, own)
        series_uid = str(own.SeriesInstanceUID)
    uid, members = _pick_series(path, groups, series_uid)
    rows, columns, iop = _check_series(members, max_voxels)
    order, spacing = _volume_order(path, members, iop)
    members = [members[i] for i in order]
    affine = _affine_ras(members, rows, columns, iop, spacing)
    rescale = [_rescale(file, ds) for file, ds in members]
    bits = int(members[0][1].get("BitsAllocated", 16) or 16)
    itemsize = 4 if any(r != (1.0, 0.0) for r in rescale) else max(1, -(-bits // 8))
    source_bytes = sum(_size(file) for file, _ in members)
    if preflight is not None:
        preflight(path, (columns, rows, len(members)), affine, itemsize, False, source_bytes)
    return _Series(uid, members, rows, columns, affine, rescale, itemsize, source_bytes)


def _size(file: Path) -> int:
    try:
        return os.stat(file).st_size
    except OSError as err:
        raise InputError(file, f"cannot read: {err.strerror or err}") from None


def check_dicom_header(path: str | Path, series_uid: str | None = None, max_voxels: int = 2**31,
                       preflight: Preflight | None = None) -> None:
    """The checks of :func:`read_dicom` that need only the headers (and ``preflight``), without decoding a pixel:
    a cheap refusal before models are loaded."""
    _checked_series(Path(path), series_uid, max_voxels, preflight)


def read_dicom(path: str | Path, series_uid: str | None = None, max_voxels: int = 2**31,
               preflight: Preflight | None = None) -> LoadedImage:
    """Read and validate a DICOM CT series: ``path`` is a folder (searched recursively) or one file of the series
    (the series is then read from that file's folder; a DICOMDIR stands for its folder). Several series and no
    ``series_uid``: an InputError listing them. Every problem is one ``InputError``; ``preflight`` is called after the
    header checks, before any pixel is decoded. The result has ``source`` set for DICOM-SEG output."""
    path = Path(path)
    series = _checked_series(path, series_uid, max_voxels, preflight)
    members = series.members
    data = _read_pixels(members, series.rows, series.columns, series.rescale).transpose(2, 1, 0)  # (col, row, slice)
    img = from_array(data, series.affine)
    img.header.set_sform(series.affine, code="scanner")
    img.header.set_qform(series.affine, code="scanner")
    if img.oblique:
        log.warning("%s: oblique slice orientation; using the closest canonical axes", path)
    source = DicomSource(series.uid, tuple(f for f, _ in members), tuple(ds for _, ds in members))
    return dataclasses.replace(img, path=path, source=source)
