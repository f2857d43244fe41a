"""RTSTRUCT output (rt-utils) of the real reference labels on a DICOM series of the real 3 mm CT, read back with
rt-utils and pydicom: ROI names, the referenced series and frame of reference, and contours on the right slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import data_path
from dicom_series import write_ct_series

pytest.importorskip("rt_utils")
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def series_and_labels(tmp_path_factory: pytest.TempPathFactory):
    from flare.runtime.image.dicom import read_dicom
    from flare.runtime.image.model import Reorientation, to_canonical
    from flare.runtime.image.nifti import read_image

    img = read_image(data_path("ts_abdomen_ct_3mm.nii.gz"))
    folder = tmp_path_factory.mktemp("rt") / "series"
    write_ct_series(folder, img.data, img.affine, rng=np.random.default_rng(3))
    dicom = read_dicom(folder)
    ref_ras, _, _ = to_canonical(read_image(data_path("ts_abdomen_labels_flare_ids.nii.gz")))
    labels = np.ascontiguousarray(Reorientation.from_affine(dicom.affine).undo(ref_ras)).astype(np.uint8)
    return folder, dicom, labels


def test_rtstruct_round_trip(series_and_labels, tmp_path: Path) -> None:
    from flare.runtime.foundation.labels import LABELS
    from flare.runtime.image.rtstruct import SERIES_DESCRIPTION, write_rtstruct
    from rt_utils import RTStructBuilder

    folder, dicom, labels = series_and_labels
    out = tmp_path / "structures.rtstruct.dcm"
    write_rtstruct(out, labels, dicom)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and ds.SeriesDescription == SERIES_DESCRIPTION
    present = [int(v) for v in np.unique(labels) if v]
    names = [roi.ROIName for roi in ds.StructureSetROISequence]
    assert names == [LABELS[i].file for i in present]
    assert "kidney_left" in names and "adrenal_gland_right" in names and len(names) == 12
    # the referenced series and frame of reference are the CT's
    src = dicom.source
    assert src is not None
    ref_frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref_frame.FrameOfReferenceUID == src.datasets[0].FrameOfReferenceUID
    series_ref = ref_frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == src.series_uid
    # contours only on slices where the label is present: each contour's image is one of those slices
    slice_of = {d.SOPInstanceUID: k for k, d in enumerate(src.datasets)}
    for roi_contour, label_id in zip(ds.ROIContourSequence, present):
        on = {slice_of[c.ContourImageSequence[0].ReferencedSOPInstanceUID] for c in roi_contour.ContourSequence}
        expected = {k for k in range(labels.shape[2]) if (labels[:, :, k] == label_id).any()}
        assert on <= expected and len(on) >= 0.8 * len(expected), (LABELS[label_id].file, on, expected)
        assert list(roi_contour.ROIDisplayColor) == list(LABELS[label_id].color)
    # every contour point (patient LPS mm) lies on a voxel of its label, on the slice it references
    lps_to_voxel = np.linalg.inv(dicom.affine) @ np.diag([-1.0, -1.0, 1.0, 1.0])
    for roi_contour, label_id in zip(ds.ROIContourSequence, present):
        hits = total = 0
        for c in roi_contour.ContourSequence:
            pts = np.reshape(np.asarray(c.ContourData, float), (-1, 3))
            vox = np.rint((lps_to_voxel @ np.c_[pts, np.ones(len(pts))].T)[:3].T).astype(int)
            assert set(vox[:, 2]) == {slice_of[c.ContourImageSequence[0].ReferencedSOPInstanceUID]}
            hits += int((labels[vox[:, 0], vox[:, 1], vox[:, 2]] == label_id).sum())
            total += len(vox)
        assert hits == total, (LABELS[label_id].file, hits, total)
    # rt-utils reads it back against the series (its reference checks pass) with the same ROI names
    back = RTStructBuilder.create_from(str(folder), str(out))
    assert back.get_roi_names() == names


def test_rtstruct_needs_dicom_and_a_segment(series_and_labels, tmp_path: Path) -> None:
    from flare.runtime.foundation.errors import OutputError
    from flare.runtime.image.nifti import read_image
    from flare.runtime.image.rtstruct import write_rtstruct

    _, dicom, labels = series_and_labels
    nifti = read_image(data_path("ts_abdomen_ct_3mm.nii.gz"))
    with pytest.raises(OutputError, match="needs a DICOM input"):
        write_rtstruct(tmp_path / "x.dcm", labels, nifti)
    with pytest.raises(OutputError, match="nothing was segmented"):
        write_rtstruct(tmp_path / "x.dcm", np.zeros_like(labels), dicom)
    assert not list(tmp_path.iterdir())
