"""DICOM CT series in (flare.runtime.image.dicom) and DICOM-SEG out (flare.runtime.image.dicomseg), on the real CTs.

The series are written from the NIfTI CTs by tests/dicom_series.py (shuffled files, random names, shuffled
InstanceNumbers), so the NIfTI is the ground truth for voxels and world geometry.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from dicom_series import LPS, write_ct_series

pytest.importorskip("highdicom")

from flare.runtime.foundation.errors import InputError, OutputError
from flare.runtime.foundation.labels import LABELS
from flare.runtime.image.dicom import find_series, is_dicom_file, read_dicom
from flare.runtime.image.dicomseg import write_dicom_seg
from flare.runtime.image.model import LoadedImage, Reorientation, to_canonical
from flare.runtime.image.nifti import read_image, write_labels

CT_3MM = "ts_abdomen_ct_3mm.nii.gz"
CT_LPS = "ts_torso_ct_1p5mm_lps.nii.gz"


def _canonical(img: LoadedImage) -> tuple[np.ndarray, np.ndarray]:
    data, affine, _ = to_canonical(img)
    return np.asarray(data), affine


def _assert_same_image(dicom: LoadedImage, nifti: LoadedImage) -> None:
    d_data, d_aff = _canonical(dicom)
    n_data, n_aff = _canonical(nifti)
    assert d_data.shape == n_data.shape
    np.testing.assert_array_equal(d_data, n_data)
    np.testing.assert_allclose(d_aff, n_aff, atol=1e-4)
    np.testing.assert_allclose(sorted(dicom.spacing), sorted(nifti.spacing), atol=1e-4)
    assert dicom.oblique == nifti.oblique


def _one_line_error(exc_info: pytest.ExceptionInfo, *words: str) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    for word in words:
        assert word in text, text
    return text


@pytest.fixture(scope="module")
def small_ct() -> tuple[np.ndarray, np.ndarray]:
    """A 48x40x12 crop of the 3 mm CT: fast to write for the refusal tests."""
    img = read_image(data_path(CT_3MM))
    return np.asarray(img.data[30:78, 30:70, 8:20]), img.affine


@pytest.fixture(scope="module")
def ct3_series(tmp_path_factory) -> tuple[Path, LoadedImage]:
    img = read_image(data_path(CT_3MM))
    folder = tmp_path_factory.mktemp("ct3") / "series"
    write_ct_series(folder, img.data, img.affine, rng=np.random.default_rng(1))
    return folder, img


# ------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("name", [CT_3MM, CT_LPS])
def test_read_dicom_matches_nifti(name, tmp_path):
    nifti = read_image(data_path(name))
    files = write_ct_series(tmp_path / "s", nifti.data, nifti.affine, rng=np.random.default_rng(2))
    dicom = read_dicom(tmp_path / "s")
    _assert_same_image(dicom, nifti)
    assert dicom.data.dtype == np.float32  # RescaleIntercept -1024 applied
    assert dicom.data.flags.f_contiguous
    assert dicom.path == tmp_path / "s"
    # slices are in position order, whatever the file names and InstanceNumbers say
    assert dicom.source is not None and sorted(dicom.source.files) == sorted(files)
    normal = np.cross(*np.reshape([float(v) for v in dicom.source.datasets[0].ImageOrientationPatient], (2, 3)))
    along = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in dicom.source.datasets]
    assert np.all(np.diff(along) < 0) or np.all(np.diff(along) > 0)
    assert [int(ds.InstanceNumber) for ds in dicom.source.datasets] != list(range(1, len(files) + 1))


def test_read_dicom_without_rescale_keeps_stored_dtype(small_ct, tmp_path):
    data, affine = small_ct
    write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(3), intercept=0.0)
    img = read_dicom(tmp_path)
    assert img.data.dtype == np.int16  # like a NIfTI without scl_slope/scl_inter
    _assert_same_image(img, LoadedImage(None, data, affine, img.header, img.spacing, False))


def test_rescale_is_applied_per_slice(small_ct, tmp_path):
    """Each slice carries its own RescaleSlope/Intercept (scanners may vary them): half the slices store 2x values
    with slope 0.5."""
    import pydicom

    data, affine = small_ct
    files = write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(23))
    for file in files[::2]:
        ds = pydicom.dcmread(file)
        ds.PixelData = (ds.pixel_array.astype(np.int16) * 2).tobytes()
        ds.RescaleSlope = "0.5"
        ds.save_as(file)
    img = read_dicom(tmp_path)
    assert img.data.dtype == np.float32
    _assert_same_image(img, LoadedImage(None, data, affine, img.header, img.spacing, False))


def test_read_dicom_of_one_file_reads_its_series(ct3_series):
    folder, nifti = ct3_series
    one = sorted(folder.iterdir())[5]
    img = read_dicom(one)
    assert img.path == one
    _assert_same_image(img, nifti)
    assert [s.n_instances for s in find_series(one)] == [nifti.shape[2]]


def test_datasets_without_preamble_are_read(small_ct, tmp_path):
    """Old archives store bare datasets (no 128-byte preamble, no file meta, implicit VR), often without a suffix."""
    import pydicom

    data, affine = small_ct
    files = write_ct_series(tmp_path / "s", data, affine, rng=np.random.default_rng(22))
    for i, file in enumerate(files):
        ds = pydicom.dcmread(file)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(tmp_path / f"IM{i:04d}", ds, implicit_vr=True, little_endian=True,
                         enforce_file_format=False)
        file.unlink()
    assert is_dicom_file(tmp_path / "IM0000") and (tmp_path / "IM0000").read_bytes()[128:132] != b"DICM"
    img = read_dicom(tmp_path)
    _assert_same_image(img, LoadedImage(None, data, affine, img.header, img.spacing, False))
    labels = (np.asarray(img.data) > 0).astype(np.uint8)
    write_dicom_seg(tmp_path / "seg.dcm", labels, img)
    np.testing.assert_array_equal(_seg_labels_in_source_grid(tmp_path / "seg.dcm", img), labels)


def test_a_dicomdir_stands_for_its_folder(small_ct, tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    data, affine = small_ct
    write_ct_series(tmp_path / "IMAGES", data, affine, rng=np.random.default_rng(21))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "FLARE"
    ds.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    assert [s.n_instances for s in find_series(tmp_path)] == [12]
    assert read_dicom(tmp_path / "DICOMDIR").shape == data.shape


def test_oblique_orientation_matches_nifti(small_ct, tmp_path):
    data, affine = small_ct
    angle_z, angle_x = np.radians(12.0), np.radians(-7.0)
    rot_z = np.array([[np.cos(angle_z), -np.sin(angle_z), 0], [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]])
    oblique = affine.copy()
    oblique[:3, :3] = rot_z @ rot_x @ affine[:3, :3]
    nib.save(nib.Nifti1Image(data, oblique), tmp_path / "oblique.nii.gz")
    nifti = read_image(tmp_path / "oblique.nii.gz")
    write_ct_series(tmp_path / "s", data, oblique, rng=np.random.default_rng(4))
    dicom = read_dicom(tmp_path / "s")
    assert dicom.oblique and nifti.oblique
    _assert_same_image(dicom, nifti)
    # the world position of every voxel agrees, not only the canonical grid
    d_data, d_aff = _canonical(dicom)
    ijk = np.array([[0, 0, 0, 1], [5, 7, 3, 1], [d_data.shape[0] - 1, d_data.shape[1] - 1, d_data.shape[2] - 1, 1]])
    np.testing.assert_allclose(ijk @ d_aff.T, ijk @ _canonical(nifti)[1].T, atol=1e-4)
    # a DICOM-SEG on the oblique grid decodes back to the same voxels, and highdicom places it on the same grid
    import highdicom as hd

    labels = np.where(np.asarray(dicom.data) > 100, 1, np.where(np.asarray(dicom.data) > 0, 3, 0)).astype(np.uint8)
    write_dicom_seg(tmp_path / "seg.dcm", labels, dicom)
    np.testing.assert_array_equal(_seg_labels_in_source_grid(tmp_path / "seg.dcm", dicom), labels)
    volume = hd.seg.segread(tmp_path / "seg.dcm").get_volume(combine_segments=True)
    assert volume.spatial_shape == tuple(reversed(dicom.shape))
    np.testing.assert_allclose(volume.permute_spatial_axes([2, 1, 0]).get_affine("RAH"), dicom.affine, atol=1e-4)


def test_labels_written_as_nifti_from_a_dicom_image(small_ct, tmp_path):
    data, affine = small_ct
    write_ct_series(tmp_path / "s", data, affine, rng=np.random.default_rng(5))
    img = read_dicom(tmp_path / "s")
    labels = (np.asarray(img.data) > 0).astype(np.uint8)
    write_labels(tmp_path / "out.nii.gz", labels, img)
    back = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    assert int(back.header["sform_code"]) == 1  # scanner coordinates
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)


# ------------------------------------------------------------------------------------------------ pipeline + SEG
def _seg_labels_in_source_grid(seg_path: Path, img: LoadedImage) -> np.ndarray:
    """Decode a DICOM-SEG with highdicom into FLARE ids on ``img``'s voxel grid."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    uids = [ds.SOPInstanceUID for ds in img.source.datasets]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)  # (slice, row, column) segment numbers
    names = {lab.name: lab.id for lab in LABELS}
    lut = np.zeros(seg.number_of_segments + 1, dtype=np.uint8)
    for number in seg.get_segment_numbers():
        lut[number] = names[seg.get_segment_description(number).segment_label]
    return lut[frames].transpose(2, 1, 0)


def test_pipeline_dicom_equals_nifti_and_dicom_seg_round_trip(tiny_bundle, ct3_series, tmp_path):
    import highdicom as hd
    from flare.runtime.pipeline.segmenter import Segmenter

    folder, nifti = ct3_series
    dicom = read_dicom(folder)
    segmenter = Segmenter(tiny_bundle, device="cpu")
    lab_nifti = segmenter.segment(nifti).labels
    from_dicom = segmenter.segment(dicom)
    lab_dicom, aff_dicom = from_dicom.labels, from_dicom.affine
    np.testing.assert_array_equal(aff_dicom, dicom.affine)
    ras_n = Reorientation.from_affine(nifti.affine).apply(lab_nifti)
    ras_d = Reorientation.from_affine(dicom.affine).apply(lab_dicom)
    assert ras_d.shape == ras_n.shape
    assert float(np.mean(ras_d == ras_n)) >= 0.999
    present = sorted(int(v) for v in np.unique(lab_dicom) if v)
    assert present, "the tiny bundle should label something on the real CT"

    out = tmp_path / "seg.dcm"
    write_dicom_seg(out, lab_dicom, dicom)
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # uncompressed: lossless
    assert seg.Modality == "SEG"
    # one segment per present label, FLARE names, SNOMED codes from the registry, algorithm identified
    descriptions = [seg.get_segment_description(n) for n in seg.get_segment_numbers()]
    assert [d.segment_label for d in descriptions] == [LABELS[i].name for i in present]
    for d, label_id in zip(descriptions, present):
        snomed = LABELS[label_id].snomed
        assert (d.segmented_property_type.value, d.segmented_property_type.scheme_designator) == (snomed.type[0], "SCT")
        assert d.segmented_property_category.value == snomed.category[0]
        assert d.algorithm_type.value == "AUTOMATIC"
        assert d.algorithm_identification[0].AlgorithmName == "flare"
    # references the source series and its instances, same study and patient
    refs = seg.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in refs] == [dicom.source.series_uid]
    source_uids = {ds.SOPInstanceUID for ds in dicom.source.datasets}
    assert {i.ReferencedSOPInstanceUID for i in refs[0].ReferencedInstanceSequence} <= source_uids
    assert seg.StudyInstanceUID == dicom.source.datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == dicom.source.datasets[0].FrameOfReferenceUID
    # pixel data decoded back into the source grid equals the labels
    np.testing.assert_array_equal(_seg_labels_in_source_grid(out, dicom), lab_dicom)


def test_dicom_seg_of_reference_labels_round_trips_with_laterality(ct3_series, tmp_path):
    """All 12 organs of the real label map, including left/right kidneys and adrenals (laterality modifiers)."""
    import highdicom as hd

    folder, _ = ct3_series
    dicom = read_dicom(folder)
    ref = read_image(data_path("ts_abdomen_labels_flare_ids.nii.gz"))
    ref_ras, _, _ = to_canonical(ref)
    labels = np.ascontiguousarray(Reorientation.from_affine(dicom.affine).undo(ref_ras)).astype(np.uint8)
    out = tmp_path / "ref.dcm"
    write_dicom_seg(out, labels, dicom)
    np.testing.assert_array_equal(_seg_labels_in_source_grid(out, dicom), labels)
    seg = hd.seg.segread(out)
    by_label = {seg.get_segment_description(n).segment_label: seg.SegmentSequence[n - 1]
                for n in seg.get_segment_numbers()}
    assert len(by_label) == 12
    for name, side in (("right kidney", "Right"), ("left kidney", "Left"), ("left adrenal gland", "Left")):
        prop = by_label[name].SegmentedPropertyTypeCodeSequence[0]
        assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == side
    # the SEG's own geometry (highdicom's volume) is the image's grid
    volume = seg.get_volume(combine_segments=True)
    np.testing.assert_allclose(volume.permute_spatial_axes([2, 1, 0]).get_affine("RAH"), dicom.affine, atol=1e-4)


def test_registry_snomed_codes_match_pydicom():
    from pydicom.sr.codedict import codes

    for label in LABELS[1:]:
        keyword = "".join(w.capitalize() for w in label.snomed.type[1].split())
        assert getattr(codes.SCT, keyword).value == label.snomed.type[0], label.name
        category = "".join(w.capitalize() for w in label.snomed.category[1].split())
        assert getattr(codes.SCT, category).value == label.snomed.category[0]
        if label.snomed.laterality:
            assert getattr(codes.SCT, label.snomed.laterality[1]).value == label.snomed.laterality[0]
    assert LABELS[14].snomed.type[1] == "Neoplasm"


def test_dicom_seg_needs_a_dicom_source(small_ct, tmp_path):
    data, affine = small_ct
    nifti = LoadedImage(None, data, affine, None, (3.0, 3.0, 3.0), False)  # type: ignore[arg-type]
    with pytest.raises(OutputError) as exc:
        write_dicom_seg(tmp_path / "x.dcm", np.zeros(data.shape, np.uint8), nifti)
    _one_line_error(exc, "x.dcm", "DICOM input")
    assert not (tmp_path / "x.dcm").exists()


def test_ct_beside_its_dicom_seg_is_still_read(small_ct, tmp_path):
    data, affine = small_ct
    write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(6))
    img = read_dicom(tmp_path)
    write_dicom_seg(tmp_path / "seg.dcm", (np.asarray(img.data) > 0).astype(np.uint8), img)
    (tmp_path / "notes.txt").write_text("not DICOM: ignored")
    (tmp_path / "seg.nii.gz").write_bytes(b"\x1f\x8b not DICOM either")
    assert sorted(s.modality for s in find_series(tmp_path)) == ["CT", "SEG"]
    again = read_dicom(tmp_path)
    assert again.source.series_uid == img.source.series_uid


# ------------------------------------------------------------------------------------------------ refusals
def test_two_series_are_listed_and_series_uid_picks_one(small_ct, tmp_path):
    data, affine = small_ct
    write_ct_series(tmp_path / "a", data, affine, rng=np.random.default_rng(7), series_uid="1.2.3.1",
                    description="venous")
    write_ct_series(tmp_path / "b", data[:, :, :10], affine, rng=np.random.default_rng(8), series_uid="1.2.3.2",
                    description="arterial")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "2 series", "--series", "1.2.3.1", "venous", "1.2.3.2", "arterial", "12 files", "10 files")
    assert {(s.uid, s.description, s.n_instances, s.folder.name) for s in find_series(tmp_path)} == {
        ("1.2.3.1", "venous", 12, "a"), ("1.2.3.2", "arterial", 10, "b")}
    assert read_dicom(tmp_path, series_uid="1.2.3.2").shape == (48, 40, 10)
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path, series_uid="9.9")
    _one_line_error(exc, "no series 9.9", "1.2.3.1")


def _tilted_positions(affine: np.ndarray, n: int, degrees: float) -> np.ndarray:
    lps = LPS @ affine
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    step = np.linalg.norm(lps[:3, 2])
    shift = np.tan(np.radians(degrees)) * step
    return np.array([lps[:3, 3] + k * lps[:3, 2] + k * shift * col_dir for k in range(n)])


@pytest.mark.parametrize("degrees", [15.0, 2.0])
def test_gantry_tilt_is_refused(small_ct, tmp_path, degrees):
    """15 degrees, and 2 degrees, which highdicom alone accepts (its tolerance is ~2.5 degrees off the normal) although
    it shifts the last of these 12 slices by ~1.2 mm."""
    import highdicom as hd
    import pydicom

    data, affine = small_ct
    files = write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(9),
                            positions=_tilted_positions(affine, data.shape[2], degrees))
    if degrees < 2.5:
        spacing, _ = hd.spatial.get_series_volume_positions([pydicom.dcmread(f) for f in files])
        assert spacing is not None
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, str(tmp_path), "gantry tilt", f"{degrees:.2f} degrees")


def _positions(affine: np.ndarray, offsets: list[float]) -> np.ndarray:
    lps = LPS @ affine
    unit = lps[:3, 2] / np.linalg.norm(lps[:3, 2])
    return np.array([lps[:3, 3] + d * unit for d in offsets])


def test_uneven_gaps_are_refused(small_ct, tmp_path):
    data, affine = small_ct
    offsets = [3.0 * k for k in range(data.shape[2])]
    offsets[6:] = [d + 1.2 for d in offsets[6:]]  # one 4.2 mm gap among 3 mm ones
    write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(11), positions=_positions(affine, offsets))
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "uneven slice spacing", "4.2 mm")


def test_missing_slice_is_refused(small_ct, tmp_path):
    data, affine = small_ct
    files = write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(12))
    files[5].unlink()
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "missing slice", "gap of 6 mm", "spacing is 3 mm", files[4].name, files[6].name)


def test_duplicate_position_is_refused(small_ct, tmp_path):
    data, affine = small_ct
    files = write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(13))
    import pydicom

    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "copy.dcm")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "same position", "copy.dcm", files[3].name)


def test_mixed_sizes_are_refused(small_ct, tmp_path):
    data, affine = small_ct
    files = write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(14), series_uid="1.2.3.4")
    small = write_ct_series(tmp_path / "other", data[:20, :20, :1], affine, rng=np.random.default_rng(15),
                            series_uid="1.2.3.4")
    assert len(small) == 1 and len(files) == 12
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "mixed image sizes", "20x20", "40x48")


def test_non_ct_modality_is_refused(small_ct, tmp_path):
    data, affine = small_ct
    write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(16), modality="MR")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "modality is MR", "CT images only")


def _write_text_sr(path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "SR", generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)


def test_non_image_dicom_file_is_refused(tmp_path):
    _write_text_sr(tmp_path / "report.dcm")
    assert is_dicom_file(tmp_path / "report.dcm")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path / "report.dcm")
    _one_line_error(exc, "report.dcm", "not an image", "Basic Text SR")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "not an image")


def test_corrupt_files_are_refused(small_ct, tmp_path):
    data, affine = small_ct
    files = write_ct_series(tmp_path / "s", data, affine, rng=np.random.default_rng(17))
    raw = files[2].read_bytes()
    files[2].write_bytes(raw[: len(raw) - 500])  # truncated pixel data
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path / "s")
    _one_line_error(exc, files[2].name, "cannot decode the pixel data")
    files[2].write_bytes(raw[:132] + b"\x08\x00\x16\x00UI\xff\x7f" + b"\x00" * 20)  # 'DICM' then a broken element
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path / "s")
    _one_line_error(exc, files[2].name, "corrupt DICOM file")
    with pytest.raises(InputError) as exc:  # discovery names it too (the batch fails only the case around it)
        find_series(tmp_path)
    _one_line_error(exc, files[2].name, "corrupt DICOM file")


def test_not_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert not is_dicom_file(tmp_path / "notes.txt")
    assert not is_dicom_file(tmp_path / "missing.dcm")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path)
    _one_line_error(exc, "no DICOM files")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path / "notes.txt")
    _one_line_error(exc, "notes.txt", "not a DICOM file")
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path / "nowhere")
    _one_line_error(exc, "does not exist")


def test_voxel_limit_is_checked_before_reading_pixels(small_ct, tmp_path):
    data, affine = small_ct
    write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(18))
    with pytest.raises(InputError) as exc:
        read_dicom(tmp_path, max_voxels=1000)
    _one_line_error(exc, "12 slices of 40x48", "limit of 1000")


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless"])
def test_compressed_series_are_decoded(small_ct, tmp_path, syntax):
    """Lossless-compressed series (as PACS exports them) decode with the dicom extra's plugins."""
    import pydicom
    import pydicom.uid

    data, affine = small_ct
    files = write_ct_series(tmp_path / "s", data, affine, rng=np.random.default_rng(19))
    plain = read_dicom(tmp_path / "s")
    for file in files:
        ds = pydicom.dcmread(file)
        ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(file)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    img = read_dicom(tmp_path / "s")
    np.testing.assert_array_equal(img.data, plain.data)
    np.testing.assert_array_equal(img.affine, plain.affine)


def test_dicom_seg_of_empty_labels_is_refused(small_ct, tmp_path):
    data, affine = small_ct
    write_ct_series(tmp_path / "s", data, affine, rng=np.random.default_rng(20))
    img = read_dicom(tmp_path / "s")
    with pytest.raises(OutputError) as exc:
        write_dicom_seg(tmp_path / "empty.dcm", np.zeros(img.shape, np.uint8), img)
    _one_line_error(exc, "empty.dcm", "nothing was segmented")
    assert not (tmp_path / "empty.dcm").exists()


def test_dicom_modules_import_pydicom_lazily():
    code = ("import sys, flare.runtime.image.dicom, flare.runtime.image.dicomseg, flare.runtime as rt; rt.read_dicom; "
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('pydicom', 'highdicom')]; "
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_damaged_modality_lut_names_the_file(small_ct, tmp_path):
    """A Modality LUT whose descriptor promises more entries than its data holds: one line naming the slice
    (it was "error: unpack requires a buffer of 131072 bytes", without a file)."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    data, affine = small_ct
    files = write_ct_series(tmp_path, data, affine, rng=np.random.default_rng(5), intercept=0.0)
    ds = pydicom.dcmread(files[3])
    for key in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if key in ds:
            delattr(ds, key)
    lut = Dataset()
    lut.LUTDescriptor = [0, -32768, 16]
    lut.LUTData = b"\0" * 20
    lut.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = Sequence([lut])
    ds.save_as(files[3])
    with pytest.raises(InputError) as info:
        read_dicom(tmp_path)
    _one_line_error(info, files[3].name)
