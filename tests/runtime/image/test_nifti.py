"""flare.runtime.image.nifti: validated reading, reorientation round trips, atomic label writing (real nibabel, real CTs)."""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from flare.runtime.foundation.errors import InputError, OutputError
from flare.runtime.image.model import Reorientation, from_array, to_canonical
from flare.runtime.image.nifti import read_image, write_labels

REAL_CTS = ["ts_abdomen_ct_3mm.nii.gz", "ts_abdomen_labels_flare_ids.nii.gz", "ts_body_ct_3mm_int32.nii.gz",
            "ts_torso_ct_1p5mm_lps.nii.gz"]


def _raw_nifti(path: Path, data: np.ndarray, *, hdr: nib.Nifti1Header | None = None, gz: bool = False,
               cut: int = 0, endian: str = "<", **fields: object) -> Path:
    """Write a single-file NIfTI byte by byte (full control over header fields, byte order and truncation)."""
    if hdr is None:
        hdr = nib.Nifti1Header(endianness=endian)
        hdr.set_data_shape(data.shape)
        hdr.set_data_dtype(data.dtype)
        hdr.set_zooms((1.0,) * data.ndim)
        hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code="scanner")
    hdr["magic"] = b"n+1" if isinstance(hdr, nib.Nifti1Header) and not isinstance(hdr, nib.Nifti2Header) else b"n+2"
    for key, value in fields.items():
        hdr[key] = value
    hdr["vox_offset"] = hdr.template_dtype.itemsize + 4
    dtype = hdr.get_data_dtype()
    blob = hdr.binaryblock + b"\x00" * 4 + np.asarray(data, dtype=dtype).tobytes(order="F")
    if gz:
        blob = gzip.compress(blob, compresslevel=1)
    path.write_bytes(blob[:len(blob) - cut] if cut else blob)
    return path


def _one_line_input_error(path: Path, call: object = None, **kwargs: object) -> str:
    with pytest.raises(InputError) as info:
        read_image(path, **kwargs)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# ------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("name", REAL_CTS)
def test_read_real_ct_equals_nibabel(name: str) -> None:
    path = data_path(name)
    img, ref = read_image(path), nib.load(path)
    raw = np.asanyarray(ref.dataobj)
    assert img.data.dtype == raw.dtype and img.data.shape == ref.shape
    assert np.array_equal(img.data, raw)
    assert np.array_equal(img.affine, ref.affine) and img.affine.dtype == np.float64
    assert img.spacing == pytest.approx(ref.header.get_zooms()[:3])
    assert not img.oblique and img.path == path
    assert img.header is not ref.header and img.header["sform_code"] == ref.header["sform_code"]


def test_read_without_isal_uses_stdlib_gzip(monkeypatch: pytest.MonkeyPatch) -> None:
    path = data_path("ts_abdomen_ct_3mm.nii.gz")
    monkeypatch.setitem(sys.modules, "isal", None)  # "import isal" now raises ImportError
    assert np.array_equal(read_image(path).data, np.asanyarray(nib.load(path).dataobj))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_read_synthetic_byte_orders(tmp_path: Path, gz: bool, endian: str, rng: np.random.Generator) -> None:
    data = rng.integers(-1024, 3000, (7, 5, 3)).astype(np.int16)
    path = _raw_nifti(tmp_path / ("x.nii.gz" if gz else "x.nii"), data, gz=gz, endian=endian)
    img = read_image(path)
    assert img.data.dtype == np.dtype("int16") and img.data.dtype.isnative
    assert np.array_equal(img.data, data) and np.array_equal(img.data, nib.load(path).get_fdata())


def test_scaling_applied_like_nibabel(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = rng.integers(0, 4000, (6, 5, 4)).astype(np.uint16)
    path = _raw_nifti(tmp_path / "scaled.nii.gz", raw, gz=True, scl_slope=0.5, scl_inter=-1024.0)
    img = read_image(path)
    assert img.data.dtype == np.float32
    assert np.allclose(img.data, nib.load(path).get_fdata(), atol=1e-3)
    for slope in (0.0, np.nan):  # nibabel: slope 0 or NaN means no scaling
        img = read_image(_raw_nifti(tmp_path / "noscale.nii", raw, scl_slope=slope, scl_inter=5.0))
        assert img.data.dtype == np.uint16 and np.array_equal(img.data, raw)


def test_single_volume_4d_is_squeezed(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.random((4, 3, 2, 1)).astype(np.float32)
    img = read_image(_raw_nifti(tmp_path / "v.nii", data))
    assert img.data.shape == (4, 3, 2) and np.array_equal(img.data, data[..., 0])
    assert img.header.get_data_shape() == (4, 3, 2)


def test_non_finite_voxels_are_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5
    data[0, 0, 0], data[1, 2, 3], data[1, 0, 0] = np.nan, np.inf, -np.inf
    with caplog.at_level(logging.WARNING, logger="flare.runtime"):
        img = read_image(_raw_nifti(tmp_path / "nan.nii", data))
    assert np.isfinite(img.data).all()
    assert img.data[0, 0, 0] == -4 and img.data[1, 0, 0] == -4 and img.data[1, 2, 3] == 17
    assert "3 non-finite voxels" in caplog.text


def test_oblique_affine_is_accepted_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    angle = np.deg2rad(10)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), tmp_path / "obl.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flare.runtime"):
        img = read_image(tmp_path / "obl.nii.gz")
    assert img.oblique and "oblique" in caplog.text
    data_ras, affine_ras, _ = to_canonical(img)
    assert nib.aff2axcodes(affine_ras) == ("R", "A", "S") and data_ras.shape == (4, 4, 4)


def test_nifti2_is_read(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 100, (5, 4, 3)).astype(np.int32)
    nib.save(nib.Nifti2Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "n2.nii")
    img = read_image(tmp_path / "n2.nii")
    assert isinstance(img.header, nib.Nifti2Header) and np.array_equal(img.data, data)
    assert img.spacing == (2.0, 2.0, 3.0)


def test_missing_folder_empty_and_not_nifti(tmp_path: Path) -> None:
    assert "does not exist" in _one_line_input_error(tmp_path / "nope.nii.gz")
    assert "folder" in _one_line_input_error(tmp_path)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert "empty" in _one_line_input_error(tmp_path / "empty.nii.gz")
    (tmp_path / "text.nii").write_text("hello, this is not an image\n" * 30)
    assert "not a NIfTI" in _one_line_input_error(tmp_path / "text.nii")
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"plain text " * 100))
    assert "not a NIfTI" in _one_line_input_error(tmp_path / "text.nii.gz")


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    real = data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(real[: len(real) // 2])
    assert "truncated" in _one_line_input_error(tmp_path / "cut.nii.gz")
    (tmp_path / "cut_trailer.nii.gz").write_bytes(real[:-4])
    assert "truncated" in _one_line_input_error(tmp_path / "cut_trailer.nii.gz")
    bad = bytearray(real)
    bad[len(bad) // 2: len(bad) // 2 + 64] = b"\xff" * 64
    (tmp_path / "bad.nii.gz").write_bytes(bytes(bad))
    assert "corrupt" in _one_line_input_error(tmp_path / "bad.nii.gz")
    data = np.zeros((10, 10, 10), np.int16)
    assert "truncated" in _one_line_input_error(_raw_nifti(tmp_path / "cut.nii", data, cut=10))


def test_dimension_checks(tmp_path: Path) -> None:
    assert "2-D" in _one_line_input_error(_raw_nifti(tmp_path / "flat.nii", np.zeros((5, 6), np.int16)))
    assert "2 volumes" in _one_line_input_error(_raw_nifti(tmp_path / "v2.nii", np.zeros((3, 3, 3, 2), np.int16)))
    small = _raw_nifti(tmp_path / "small.nii", np.zeros((4, 4, 4), np.int16))
    assert "limit" in _one_line_input_error(small, max_voxels=63)
    assert read_image(small, max_voxels=64).data.shape == (4, 4, 4)


@pytest.mark.parametrize("gz", [False, True])
def test_header_claiming_huge_data_is_refused_before_allocating(tmp_path: Path, gz: bool) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float64)
    hdr.set_data_shape((4, 4, 4))
    hdr.set_zooms((1, 1, 1))
    dims = hdr["dim"].copy()
    dims[1:4] = 30000  # 2.7e13 voxels, 216 TB, in a file of a few hundred bytes
    path = _raw_nifti(tmp_path / ("huge.nii.gz" if gz else "huge.nii"), np.zeros((4, 4, 4)), hdr=hdr, gz=gz,
                      dim=dims)
    assert "limit" in _one_line_input_error(path)
    msg = _one_line_input_error(path, max_voxels=2**62)
    assert ("impossible" in msg) if gz else ("truncated" in msg)


@pytest.mark.parametrize("zooms", [(0.0, 1.0, 1.0), (1.0, -2.0, 1.0), (1.0, 1.0, np.nan), (np.inf, 1.0, 1.0)])
def test_bad_spacing(tmp_path: Path, zooms: tuple[float, float, float]) -> None:
    pixdim = np.ones(8, dtype=np.float32)
    pixdim[1:4] = zooms
    assert "spacing" in _one_line_input_error(_raw_nifti(tmp_path / "s.nii", np.zeros((3, 3, 3), np.int16),
                                                         pixdim=pixdim))


def test_unsupported_dtype(tmp_path: Path) -> None:
    path = _raw_nifti(tmp_path / "c.nii", np.zeros((3, 3, 3), np.complex64))
    assert "unsupported data type" in _one_line_input_error(path)


# ------------------------------------------------------------------------------------------------ orientation
def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _check_same_world(data: np.ndarray, affine: np.ndarray, data_ras: np.ndarray, affine_ras: np.ndarray) -> None:
    """Each RAS voxel holds the value of the input voxel at the same world position."""
    ijk_ras = np.stack(np.meshgrid(*[np.arange(n) for n in data_ras.shape], indexing="ij"), -1).reshape(-1, 3)
    ijk_in = np.rint(_world(np.linalg.inv(affine), _world(affine_ras, ijk_ras))).astype(int)
    assert np.array_equal(data[tuple(ijk_in.T)], data_ras[tuple(ijk_ras.T)])


def test_all_48_orientations_round_trip(rng: np.random.Generator) -> None:
    data = rng.integers(0, 1000, (3, 4, 5)).astype(np.int16)
    spacing = np.array([0.7, 1.1, 2.5])
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = 0
            for axis, (world_axis, sign) in enumerate(zip(perm, signs)):
                affine[world_axis, axis] = sign * spacing[axis]
            affine[:3, 3] = [-10.0, 20.0, 5.0]
            img = from_array(data, affine)
            data_ras, affine_ras, r = to_canonical(img)
            assert nib.aff2axcodes(affine_ras) == ("R", "A", "S")
            assert np.all(np.diag(affine_ras)[:3] > 0)
            assert np.shares_memory(data_ras, data)  # views, no copy
            back = r.undo(data_ras)
            assert back.shape == data.shape and np.array_equal(back, data)
            _check_same_world(data, affine, data_ras, affine_ras)
            canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
            assert np.array_equal(np.asanyarray(canon.dataobj), data_ras)
            assert np.allclose(canon.affine, affine_ras)


def test_real_lps_ct_to_canonical() -> None:
    img = read_image(data_path("ts_torso_ct_1p5mm_lps.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    data_ras, affine_ras, r = to_canonical(img)
    assert nib.aff2axcodes(affine_ras) == ("R", "A", "S") and r == Reorientation((0, 1, 2), (0, 1))
    assert np.array_equal(r.undo(r.apply(img.data)), img.data)
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in data_ras.shape])))
    flipped = np.array(img.data.shape) - 1 - corners
    flipped[:, 2] = corners[:, 2]
    assert np.allclose(_world(affine_ras, corners), _world(img.affine, flipped))
    _check_same_world(img.data, img.affine, data_ras[::7, ::7, ::7], affine_ras @ np.diag([7, 7, 7, 1]))


def test_matches_monai_orientation_on_lps_ct() -> None:
    from monai.transforms import Compose, LoadImage, Orientation

    path = data_path("ts_torso_ct_1p5mm_lps.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's notice about Orientation's `labels` default
        chain = Compose([LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS")])
    ref = chain(str(path))
    data_ras, affine_ras, _ = to_canonical(read_image(path))
    assert np.array_equal(np.asarray(ref[0]), data_ras)
    assert np.allclose(np.asarray(ref.affine), affine_ras, atol=1e-4)


# ------------------------------------------------------------------------------------------------ writing
def _assert_same_space(out: Path, like_path: Path, labels: np.ndarray) -> None:
    written, src = nib.load(out), nib.load(like_path)
    assert written.get_data_dtype() == np.uint8 and written.shape == src.shape
    assert np.array_equal(np.asanyarray(written.dataobj), labels)
    assert np.array_equal(written.affine, src.affine)
    for key in ("qform_code", "sform_code", "xyzt_units", "dim_info"):
        assert written.header[key] == src.header[key], key
    assert np.array_equal(written.header.get_qform(), src.header.get_qform())
    assert np.array_equal(written.header.get_sform(), src.header.get_sform())
    assert written.header.get_zooms() == src.header.get_zooms()
    assert written.header.get_slope_inter() in ((None, None), (1.0, 0.0))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_write_labels_round_trip_lps(tmp_path: Path, suffix: str) -> None:
    src = data_path("ts_torso_ct_1p5mm_lps.nii.gz")
    img = read_image(src)
    data_ras, _, r = to_canonical(img)
    labels = r.undo((data_ras > 0).astype(np.uint8) + (data_ras > 200))
    out = tmp_path / f"labels{suffix}"
    write_labels(out, labels, img)
    _assert_same_space(out, src, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp files left
    if suffix == ".nii.gz":
        assert out.read_bytes()[:2] == b"\x1f\x8b"


def test_write_labels_from_scaled_nifti2_input(tmp_path: Path) -> None:
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    hdr = nib.Nifti2Header()
    hdr.set_data_shape(raw.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.diag([-1.0, 2.0, 3.0, 1.0]), code="scanner")
    hdr.set_xyzt_units("mm", "sec")
    src = _raw_nifti(tmp_path / "n2.nii.gz", raw, hdr=hdr, gz=True, scl_slope=2.0, scl_inter=-10.0)
    img = read_image(src)
    assert img.data.dtype == np.float32
    labels = (img.data > 40).astype(np.int64)  # any integer dtype is stored as uint8
    write_labels(tmp_path / "out.nii.gz", labels, img)
    assert isinstance(nib.load(tmp_path / "out.nii.gz").header, nib.Nifti2Header)
    _assert_same_space(tmp_path / "out.nii.gz", src, labels.astype(np.uint8))


def test_write_labels_for_in_memory_image(tmp_path: Path) -> None:
    affine = np.array([[0, -2.0, 0, 5], [1.5, 0, 0, -7], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    img = from_array(np.zeros((4, 5, 6), np.float32), affine)
    assert img.spacing == (1.5, 2.0, 3.0) and img.path is None and not img.oblique
    labels = np.arange(120, dtype=np.uint8).reshape(4, 5, 6) % 15
    write_labels(tmp_path / "mem.nii", labels, img)
    back = nib.load(tmp_path / "mem.nii")
    assert np.array_equal(back.affine, affine) and np.array_equal(np.asanyarray(back.dataobj), labels)
    assert back.header.get_zooms() == (1.5, 2.0, 3.0)
    with pytest.raises(InputError):
        from_array(np.zeros((4, 5)), affine)


def test_write_labels_rejects_bad_names_and_shapes(tmp_path: Path) -> None:
    img = from_array(np.zeros((3, 3, 3), np.int16), np.eye(4))
    with pytest.raises(OutputError):
        write_labels(tmp_path / "labels.png", np.zeros((3, 3, 3), np.uint8), img)
    with pytest.raises(ValueError):
        write_labels(tmp_path / "labels.nii", np.zeros((3, 3, 2), np.uint8), img)
    with pytest.raises(OutputError) as info:
        write_labels(tmp_path / "missing" / "labels.nii.gz", np.zeros((3, 3, 3), np.uint8), img)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_labels_unwritable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        img = from_array(np.zeros((3, 3, 3), np.int16), np.eye(4))
        with pytest.raises(OutputError):
            write_labels(folder / "labels.nii.gz", np.zeros((3, 3, 3), np.uint8), img)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_failure_mid_write_leaves_no_file(tmp_path: Path) -> None:
    """A file-size limit makes the write fail half way (works for root too): OutputError, nothing left behind."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from flare.runtime.foundation.errors import OutputError
        from flare.runtime.image.model import from_array
        from flare.runtime.image.nifti import write_labels
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        labels = np.random.default_rng(0).integers(0, 15, (64, 64, 64)).astype(np.uint8)
        img = from_array(labels, np.eye(4))
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        for name in ("labels.nii", "labels.nii.gz"):
            try:
                write_labels({str(tmp_path)!r} + "/" + name, labels, img)
            except OutputError as err:
                print("OutputError", err)
            else:
                sys.exit("no error for " + name)
    """)
    res = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("OutputError") == 2
    assert list(tmp_path.iterdir()) == []


def test_check_header_start_judges_from_the_first_bytes() -> None:
    """check_header_start: the start of a real CT passes (gzip or not, however short), junk and a header declaring
    more voxels than the file holds are refused with read_image_bytes' one-line errors."""
    from flare.runtime.image.nifti import check_header_start

    blob = data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes()
    raw = gzip.decompress(blob)
    for data in (blob, raw):
        for n in (0, 10, 352, 2**16, len(data)):
            check_header_start(data[:n], "ct", len(data))  # what the start cannot tell is left to the read
    with pytest.raises(InputError, match=r"^x: not a NIfTI file \(no NIfTI-1/NIfTI-2 header\)$"):
        check_header_start(gzip.compress(os.urandom(4096)), "x", 5000)
    with pytest.raises(InputError, match="^x: corrupt gzip data"):
        check_header_start(b"\x1f\x8b" + os.urandom(4096), "x", 5000)
    with pytest.raises(InputError, match="^x: truncated: the header needs"):
        check_header_start(raw[:2**16], "x", 2**16)
    with pytest.raises(InputError, match="^x: empty file$"):
        check_header_start(b"", "x", 0)


def test_vox_offset_not_a_position_is_refused_and_too_low_is_read_and_written(tmp_path: Path) -> None:
    """vox_offset NaN, infinite or negative: one line (a NaN was a ValueError traceback); below the header's end
    (some writers leave 0 or less): the voxels are read right after the header, and the label map written with a
    valid offset (nibabel refused to write the input's, after the whole run)."""
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)

    def raw(name: str, offset: float) -> Path:
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(data.shape)
        hdr.set_data_dtype(np.int16)
        hdr.set_sform(np.eye(4), code="scanner")
        hdr["magic"] = b"n+1"
        hdr["vox_offset"] = offset
        path = tmp_path / f"{name}.nii.gz"
        path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + data.tobytes(order="F")))
        return path

    for name, offset in (("nan", float("nan")), ("inf", float("inf")), ("neg", -100.0)):
        assert "invalid vox_offset" in _one_line_input_error(raw(name, offset))
    img = read_image(raw("low", 100.0))
    assert np.array_equal(img.data, data)
    write_labels(tmp_path / "out.nii.gz", (img.data % 3).astype(np.uint8), img)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj), data % 3)


def test_scaling_beyond_float32_is_refused(tmp_path: Path) -> None:
    """scl_slope 1e38 on int16 voxels: one line (numpy printed overflow warnings and the voxels became inf)."""
    data = np.full((4, 5, 6), 1000, dtype=np.int16)
    src = _raw_nifti(tmp_path / "big.nii.gz", data, gz=True, scl_slope=1e38, scl_inter=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may escape
        assert "beyond float32" in _one_line_input_error(src)
