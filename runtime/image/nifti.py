"""Reading CT volumes, reorienting them to canonical RAS and back, and writing label maps.

Reading (:func:`read_image`) is defensive: the NIfTI header is parsed first and checked before the voxel array is
allocated (``preflight`` lets the caller refuse from the header, e.g. the pipeline's grid limits), so a 300-byte
file that claims a terabyte of voxels is refused with a one-line :class:`~flare.runtime.foundation.errors.InputError` instead
of exhausting memory. Checks, in order:

* the path exists and is a regular file (``os.stat`` before opening: a FIFO, character/block device, socket or
  folder is refused at once — opening a FIFO without a writer would block forever), not empty; gzip is
  recognised by its magic bytes (not the name) and decompressed with ``isal.igzip`` when installed (about 2x
  faster than the standard library), else :mod:`gzip`;
* a single-file NIfTI-1 (``n+1``) or NIfTI-2 (``n+2``) header, either byte order;
* 3-D, or 4-D and higher with every extra dimension 1 (squeezed); every dimension >= 1; voxels <= ``max_voxels``;
* spacing (``pixdim``) finite and > 0; ``qform_code``/``sform_code`` valid NIfTI codes; the affine (sform, else
  qform, else pixdim) finite and invertible — all before the voxels are read;
* data type int8/uint8/int16/uint16/int32/uint32/int64/uint64/float32/float64;
* plausible size: an uncompressed file must hold ``vox_offset + n * itemsize`` bytes; a gzip file must satisfy
  ``vox_offset + n * itemsize <= 1032 * compressed size`` (deflate cannot compress better than 1032:1). The gzip
  ISIZE trailer is not used: it is the size modulo 4 GiB, only describes the last gzip member, and is random bytes
  in a truncated file. A truncated or corrupt stream is detected while reading (one more byte is read after the
  voxels so that the gzip trailer and its CRC are checked).

Voxel values: ``scl_slope``/``scl_inter`` are applied with nibabel's semantics (slope 0 or non-finite means no
scaling); scaled data is float32, unscaled data keeps its dtype in native byte order. Non-finite voxels (float data
only) are replaced, with a warning on the ``flare.runtime`` logger: NaN and -inf by the smallest finite value
(air in a CT), +inf by the largest. Oblique affines are accepted (``oblique=True``, warning); reorientation then
uses the closest canonical axes, as MONAI's ``Orientation`` and nibabel's ``as_closest_canonical`` do.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from flare.runtime.foundation.atomic import write_bytes_atomic
from flare.runtime.foundation.errors import InputError, OutputError
from flare.runtime.foundation.lazy import lazy_import
from flare.runtime.image.model import SUPPORTED_DTYPES, LoadedImage, check_affine, is_oblique, replace_non_finite

if TYPE_CHECKING:
    import nibabel as nib

__all__ = ["MAX_DEFLATE_RATIO", "check_header", "check_header_start", "image_bytes", "label_bytes", "read_image", "read_image_bytes",
           "write_labels", "written_by_flare"]

log = logging.getLogger("flare.runtime")

MAX_DEFLATE_RATIO = 1032
"""Deflate's maximum compression ratio: a gzip file cannot expand to more than this times its size."""

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 64 * 2**20
_LABEL_GZIP_LEVEL = 1
FLARE_MARK = b"flare-seg"
"""``descrip`` of every label map flare writes (NIfTI header, 80 bytes): folder runs skip such files."""


# ------------------------------------------------------------------------------------------------ reading
#: isal's gzip (about 2x faster, the dev/fast-io extras) when installed, else the standard library's
_isal_gzip = lazy_import("isal.igzip", "fast-io")


def _gzip() -> Any:
    return _isal_gzip.load() if _isal_gzip.available() else gzip


def _gzip_open(source: Path | IO[bytes]) -> IO[bytes]:
    """Open a gzip file (or in-memory stream) for reading with isal when installed, else the standard library."""
    return _gzip().open(source, "rb")  # type: ignore[no-any-return]


def _decompress_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean corrupt compressed data (zlib's, and isal's when installed)."""
    import zlib

    classes: list[type[BaseException]] = [gzip.BadGzipFile, zlib.error]
    with contextlib.suppress(ImportError):
        from isal import igzip_lib

        classes.append(igzip_lib.IsalError)  # type: ignore[arg-type]
    return tuple(classes)


@contextlib.contextmanager
def _open_stream(path: Path, source: Path | bytes, compressed: bool) -> Iterator[IO[bytes]]:
    """A binary stream of the uncompressed file (``source``: the file, or its bytes received by a server);
    read errors become one-line InputErrors naming ``path``."""
    corrupt = _decompress_errors()
    raw: Path | IO[bytes] = source if isinstance(source, Path) else BytesIO(source)
    try:
        with (_gzip_open(raw) if compressed else open(raw, "rb") if isinstance(raw, Path) else raw) as stream:
            yield stream
    except EOFError:
        raise InputError(path, "truncated gzip stream (the file ends before the end of the compressed data)")
    except corrupt as err:
        raise InputError(path, f"corrupt gzip data ({err})")
    except InputError:
        raise
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}")


_NOT_REGULAR = ((stat.S_ISDIR, "is a folder, not a NIfTI file"),
                (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
                (stat.S_ISCHR, "is a character device, not a regular file"),
                (stat.S_ISBLK, "is a block device, not a regular file"),
                (stat.S_ISSOCK, "is a socket, not a regular file"))


def _check_path(path: Path) -> tuple[int, bool]:
    """File size and whether it is gzip-compressed. The file type is checked with ``os.stat`` before the file is
    opened (opening a FIFO with no writer would block forever): only regular files are read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "file does not exist")
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}")
    for is_kind, problem in _NOT_REGULAR:
        if is_kind(st.st_mode):
            raise InputError(path, problem)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "is not a regular file")
    if st.st_size == 0:
        raise InputError(path, "empty file")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}")
    return st.st_size, magic == _GZIP_MAGIC


def _read_header(path: Path, stream: IO[bytes]) -> nib.Nifti1Header:
    """Parse a NIfTI-1 or NIfTI-2 header (and extensions); the stream is left after them."""
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header
    from nibabel.spatialimages import HeaderDataError

    head = stream.read(4)
    if len(head) < 4:
        raise InputError(path, "not a NIfTI file (too short for a header)")
    sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
    klass: type[Nifti1Header] | None = Nifti1Header if 348 in sizes else Nifti2Header if 540 in sizes else None
    if klass is None:
        raise InputError(path, "not a NIfTI file (no NIfTI-1/NIfTI-2 header)")
    rest = stream.read(klass.template_dtype.itemsize - 4)
    if len(rest) < klass.template_dtype.itemsize - 4:
        raise InputError(path, "truncated NIfTI header")
    hdr = klass(head + rest, check=False)  # only parses the 348/540 bytes; fields are validated below
    magic = bytes(hdr["magic"]).rstrip(b"\x00")
    if magic in (b"ni1", b"ni2"):
        raise InputError(path, "is the header of a .hdr/.img pair; only single-file .nii/.nii.gz is supported")
    if magic not in (b"n+1", b"n+2"):
        raise InputError(path, f"not a NIfTI file (magic {magic!r})")
    ext_flag = stream.read(4)
    if len(ext_flag) == 4 and ext_flag[:1] != b"\x00":
        try:
            offset = int(hdr["vox_offset"]) - (klass.template_dtype.itemsize + 4)
            hdr.extensions = klass.exts_klass.from_fileobj(stream, offset, hdr.endianness != _native())
        except (ValueError, TypeError, OSError, HeaderDataError) as err:
            raise InputError(path, f"corrupt NIfTI header extensions ({err})")
    return hdr


def _native() -> str:
    return "<" if np.little_endian else ">"


def _validate(path: Path, hdr: nib.Nifti1Header, file_size: int, compressed: bool, max_voxels: int
              ) -> tuple[tuple[int, int, int], np.dtype, int]:
    """Shape, on-disk dtype and data offset, after every check that can be made from the header alone."""
    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InputError(path, f"invalid number of dimensions {ndim} in the header")
    if ndim < 3:
        raise InputError(path, f"is {ndim}-D; a 3-D volume is needed")
    sizes = dim[1:ndim + 1]
    if min(sizes) < 1:
        raise InputError(path, f"invalid dimensions {tuple(sizes)}")
    if any(n != 1 for n in sizes[3:]):
        raise InputError(path, f"is {ndim}-D with {math.prod(sizes[3:])} volumes (shape {tuple(sizes)}); "
                               "only a single 3-D volume is supported")
    shape = (sizes[0], sizes[1], sizes[2])
    n_vox = math.prod(shape)
    if n_vox > max_voxels:
        raise InputError(path, f"shape {shape} has {n_vox} voxels, more than the limit of {max_voxels}")
    zooms = [float(z) for z in hdr["pixdim"][1:4]]
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise InputError(path, f"invalid voxel spacing {tuple(zooms)} (must be finite and > 0)")
    from nibabel.nifti1 import xform_codes

    for key in ("qform_code", "sform_code"):
        if int(hdr[key]) not in xform_codes.value_set():
            raise InputError(path, f"invalid {key} {int(hdr[key])} in the header (valid: "
                                   f"{', '.join(str(c) for c in sorted(xform_codes.value_set()))})")
    try:
        dtype = hdr.get_data_dtype()
    except KeyError:
        raise InputError(path, f"unknown NIfTI data type code {int(hdr['datatype'])}")
    if dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
        raise InputError(path, f"unsupported data type {dtype.name} (supported: "
                               f"{', '.join(d.name for d in SUPPORTED_DTYPES)})")
    raw_offset = float(hdr["vox_offset"])
    if not np.isfinite(raw_offset) or raw_offset < 0:
        raise InputError(path, f"invalid vox_offset {raw_offset} in the header (where the voxel data start)")
    offset = max(int(raw_offset), hdr.template_dtype.itemsize + 4)  # 0 or too low: right after the header
    needed = offset + n_vox * dtype.itemsize
    if compressed and needed > MAX_DEFLATE_RATIO * file_size:
        raise InputError(path, f"header claims {needed} bytes of data, impossible for a {file_size}-byte gzip "
                               "file (corrupt header?)")
    if not compressed and needed > file_size:
        raise InputError(path, f"truncated: the header needs {needed} bytes, the file has {file_size}")
    return shape, dtype, offset


def _read_voxels(path: Path, stream: IO[bytes], hdr: nib.Nifti1Header, shape: tuple[int, int, int],
                 dtype: np.dtype, offset: int, compressed: bool) -> np.ndarray:
    """Read the voxel block into one freshly allocated array (Fortran order, like nibabel)."""
    skip = offset - stream.tell()
    if skip > 0 and len(stream.read(skip)) < skip:
        raise InputError(path, "truncated: the file ends before the voxel data")
    try:
        flat = np.empty(math.prod(shape), dtype=dtype)
    except MemoryError:
        raise InputError(path, f"not enough memory for the {math.prod(shape) * dtype.itemsize} bytes of voxel data")
    view = memoryview(flat.view(np.uint8))  # type: ignore[arg-type]
    done = 0
    while done < view.nbytes:
        got = stream.readinto(view[done:done + _READ_CHUNK])  # type: ignore[attr-defined]
        if not got:
            raise InputError(path, f"truncated: {view.nbytes - done} of {view.nbytes} bytes of voxel data missing")
        done += got
    if compressed:
        stream.read(1)  # reach the gzip trailer so that a truncated or corrupt end (CRC) is reported
    data = flat.reshape(shape, order="F")
    if dtype.byteorder not in ("=", "|", _native()):
        data = data.byteswap().view(dtype.newbyteorder("="))
    return data


def _scaling(path: Path, hdr: nib.Nifti1Header) -> tuple[float, float] | None:
    """``(slope, inter)`` when the header scales intensities (nibabel's semantics), else None."""
    from nibabel.spatialimages import HeaderDataError

    try:
        slope, inter = hdr.get_slope_inter()
    except HeaderDataError as err:
        raise InputError(path, f"invalid intensity scaling: {err}")
    if slope is None or (slope == 1.0 and inter == 0.0):
        return None
    return float(slope), float(inter or 0.0)


def _apply_scaling(path: Path, hdr: nib.Nifti1Header, data: np.ndarray) -> np.ndarray:
    scaling = _scaling(path, hdr)
    if scaling is None:
        return data
    slope, inter = scaling
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not printed as a warning
        out = np.multiply(data, np.float32(slope), dtype=np.float32)
        if inter:
            out += np.float32(inter)
    if np.isinf(out).any() and not (data.dtype.kind == "f" and np.isinf(data).any()):
        raise InputError(path, f"scl_slope {slope:g} and scl_inter {inter:g} take voxel values beyond float32 "
                               "(corrupt header?)")
    return out


Preflight = Callable[[Path, tuple[int, int, int], np.ndarray, int, bool, int], None]
"""``preflight(path, shape, affine, itemsize, scaled, source_bytes)``: called after the header checks, before any
voxel array is allocated (e.g. :func:`flare.runtime.pipeline.limits.check_grids` on the grids the pipeline will need);
``source_bytes`` is the size of the file (or of the received bytes); raises to refuse."""


@dataclass(frozen=True)
class _Header:
    hdr: nib.Nifti1Header
    shape: tuple[int, int, int]
    dtype: np.dtype
    offset: int
    affine: np.ndarray
    scaled: bool


def _checked_header(path: Path, stream: IO[bytes], file_size: int, compressed: bool, max_voxels: int,
                    preflight: Preflight | None) -> _Header:
    """Every check that needs only the header (the stream is left after it), then ``preflight``."""
    hdr = _read_header(path, stream)
    shape, dtype, offset = _validate(path, hdr, file_size, compressed, max_voxels)
    hdr.set_data_shape(shape)  # squeezes trailing singleton dimensions
    affine = _header_affine(path, hdr)
    scaled = _scaling(path, hdr) is not None
    if preflight is not None:
        preflight(path, shape, affine, dtype.itemsize, scaled, file_size)
    return _Header(hdr, shape, dtype, offset, affine, scaled)


def check_header(path: str | Path, max_voxels: int = 2**31, preflight: Preflight | None = None) -> None:
    """The checks of :func:`read_image` that need only the header (and ``preflight``), without reading voxels:
    a cheap refusal before anything else is loaded."""
    path = Path(path)
    file_size, compressed = _check_path(path)
    with _open_stream(path, path, compressed) as stream:
        _checked_header(path, stream, file_size, compressed, max_voxels, preflight)


class _BeyondStart(Exception):
    """A check needed more bytes than the start of the file that :func:`check_header_start` was given."""


class _Start(BytesIO):
    """The start of a file as a stream; reading past it raises :class:`_BeyondStart` unless it is the whole file."""

    def __init__(self, data: bytes, whole: bool) -> None:
        super().__init__(data)
        self.whole = whole

    def read(self, n: int | None = -1) -> bytes:
        out = super().read(n)
        if not self.whole and (n is None or n < 0 or len(out) < n):
            raise _BeyondStart
        return out


def check_header_start(start: bytes, name: str | Path, size: int, max_voxels: int = 2**31,
                       preflight: Preflight | None = None) -> None:
    """:func:`check_header` from only the first bytes (``start``) of a ``size``-byte ``.nii``/``.nii.gz`` file, e.g.
    the beginning of a request body that ``flare-serve`` checks before the rest arrives: the same one-line InputErrors
    as :func:`read_image_bytes` for everything those bytes can tell (a gzip start is inflated only as far as it
    goes); a check that needs bytes beyond ``start`` is left to the full read."""
    path = Path(name)
    if size <= 0:
        raise InputError(path, "empty file")
    compressed = start[:2] == _GZIP_MAGIC
    head, whole = start, len(start) >= size
    if compressed:
        inflate = zlib.decompressobj(31)  # gzip framing
        try:
            head = inflate.decompress(start, len(start) + 2**16)
        except zlib.error as err:
            raise InputError(path, f"corrupt gzip data ({err})")
        whole = inflate.eof and not inflate.unused_data  # another gzip member may follow
    try:
        _checked_header(path, _Start(head, whole), size, compressed, max_voxels, preflight)
    except _BeyondStart:
        pass


def read_image(path: str | Path, max_voxels: int = 2**31, preflight: Preflight | None = None) -> LoadedImage:
    """Read and validate a 3-D NIfTI image (``.nii`` or ``.nii.gz``); every problem is one ``InputError``."""
    path = Path(path)
    file_size, compressed = _check_path(path)
    return _read(path, path, file_size, compressed, max_voxels, preflight)


def read_image_bytes(data: bytes, name: str | Path, max_voxels: int = 2**31,
                     preflight: Preflight | None = None) -> LoadedImage:
    """:func:`read_image` for the bytes of a ``.nii``/``.nii.gz`` file (gzip recognised by its magic bytes), e.g. a
    file received by ``flare-serve``, with the same checks; ``name`` labels the errors and becomes ``path``."""
    path = Path(name)
    if not data:
        raise InputError(path, "empty file")
    return _read(path, bytes(data), len(data), data[:2] == _GZIP_MAGIC, max_voxels, preflight)


def _read(path: Path, source: Path | bytes, file_size: int, compressed: bool, max_voxels: int,
          preflight: Preflight | None) -> LoadedImage:
    with _open_stream(path, source, compressed) as stream:
        h = _checked_header(path, stream, file_size, compressed, max_voxels, preflight)
        data = _read_voxels(path, stream, h.hdr, h.shape, h.dtype, h.offset, compressed)
    data = replace_non_finite(path, _apply_scaling(path, h.hdr, data))
    oblique = is_oblique(h.affine)
    if oblique:
        log.warning("%s: oblique affine (axes not aligned with the world axes); using the closest canonical axes",
                    path)
    zooms = h.hdr.get_zooms()
    spacing = (float(zooms[0]), float(zooms[1]), float(zooms[2]))
    return LoadedImage(path, data, h.affine, h.hdr, spacing, oblique)


def _header_affine(path: Path, hdr: nib.Nifti1Header) -> np.ndarray:
    """nibabel's best affine (sform, else qform, else pixdim), checked finite and invertible."""
    with np.errstate(all="ignore"):
        try:
            affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        except (ValueError, ArithmeticError) as err:
            raise InputError(path, f"invalid orientation (qform/sform) in the header: {err}")
    check_affine(path, affine)
    return affine


# ------------------------------------------------------------------------------------------------ writing
def _gzip_write(stream: IO[bytes]) -> IO[bytes]:
    return _gzip().open(stream, "wb", compresslevel=_LABEL_GZIP_LEVEL)  # type: ignore[no-any-return]


def _image_like(labels: np.ndarray, like: LoadedImage) -> nib.Nifti1Image:
    """An image of ``labels`` (its dtype, unscaled) carrying ``like``'s header fields (units, dim info, qform/sform
    and codes) and affine."""
    import nibabel as nib
    from nibabel.nifti2 import Nifti2Header

    src = like.header
    hdr = src.copy()
    hdr.set_data_shape(labels.shape)
    hdr.set_data_dtype(labels.dtype)
    hdr.set_slope_inter(None, None)
    hdr["vox_offset"] = max(float(hdr["vox_offset"]), hdr.single_vox_offset)  # an input's may be too low
    klass = nib.Nifti2Image if isinstance(src, Nifti2Header) else nib.Nifti1Image
    img = klass(labels, like.affine, hdr)
    out = img.header
    # nibabel rewrites the sform/qform when the affine and header disagree: keep the input's fields verbatim
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units", "dim_info"):
        out[key] = src[key]
    pixdim = np.array(out["pixdim"])
    pixdim[:4] = src["pixdim"][:4]
    out["pixdim"] = pixdim
    return img


def label_bytes(labels: np.ndarray, like: LoadedImage, compressed: bool = True) -> bytes:
    """A label map as the bytes of a uint8 NIfTI file (gzip-compressed unless ``compressed`` is false) in ``like``'s
    space: its shape, affine and header fields, and ``descrip`` = :data:`FLARE_MARK` (so that a later folder run
    recognises it as flare's output, not a CT). ``labels`` must have ``like``'s shape and values in 0..255."""
    if tuple(labels.shape) != tuple(like.data.shape):
        raise ValueError(f"labels shape {labels.shape} does not match the image shape {like.data.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"label values {labels.min()}..{labels.max()} do not fit uint8")
        labels = labels.astype(np.uint8)
    img = _image_like(labels, like)
    img.header["descrip"] = FLARE_MARK
    return _nifti_bytes(img, compressed)


def written_by_flare(path: str | Path) -> str | None:
    """The header's ``descrip`` when ``path`` is a NIfTI label map flare wrote (``descrip`` starts with
    :data:`FLARE_MARK`), else None; never raises (an unreadable file is judged when it is read)."""
    path = Path(path)
    try:
        _, compressed = _check_path(path)
        with _open_stream(path, path, compressed) as stream:
            hdr = _read_header(path, stream)
    except (InputError, OSError, EOFError):
        return None
    descrip = bytes(hdr["descrip"]).split(b"\x00")[0]
    return descrip.decode("ascii", "replace") if descrip.startswith(FLARE_MARK) else None


def image_bytes(img: LoadedImage, compressed: bool = True) -> bytes:
    """A loaded image (e.g. a DICOM series) as the bytes of a NIfTI file: its voxels as loaded (scaling applied) and
    its header fields; :func:`read_image_bytes` gives back the same voxels and affine. ``flare-run --server`` sends
    these."""
    return _nifti_bytes(_image_like(np.asarray(img.data), img), compressed)


def _nifti_bytes(img: nib.Nifti1Image, compressed: bool) -> bytes:
    buf = BytesIO()
    if compressed:
        with _gzip_write(buf) as stream:
            img.to_stream(stream)  # type: ignore[arg-type]
    else:
        img.to_stream(buf)  # type: ignore[arg-type]
    return buf.getvalue()


def write_labels(path: str | Path, labels: np.ndarray, like: LoadedImage) -> None:
    """Write a label map as uint8 NIfTI in ``like``'s space (``.nii`` or ``.nii.gz`` by name), atomically.

    ``labels`` must have ``like``'s shape and values in 0..255. Output problems raise ``OutputError``; a failure
    leaves no file at ``path``.
    """
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        compressed = True
    elif path.name.endswith(".nii"):
        compressed = False
    else:
        raise OutputError(path, "output name must end in .nii or .nii.gz")
    write_bytes_atomic(path, label_bytes(labels, like, compressed))

