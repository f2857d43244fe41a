"""Test helper: write a CT volume (NIfTI voxel grid + RAS affine) as a DICOM CT series with pydicom.

Slice k of the series holds ``data[:, :, k]`` with rows along voxel axis 1 and columns along voxel axis 0;
ImagePositionPatient / ImageOrientationPatient / PixelSpacing come from the affine (converted to DICOM's LPS).
Pixels are int16 with RescaleSlope 1 / RescaleIntercept -1024 (stored = HU + 1024). Files are written in shuffled
order under random names, with shuffled InstanceNumbers, so that only the geometry can order them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
INTERCEPT = -1024.0


def _ds(value: float) -> str:
    """A DS (decimal string) as precise as its 16 characters allow, as scanners write them."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write_ct_series(folder: Path, data: np.ndarray, affine: np.ndarray, *, rng: np.random.Generator,
                    series_uid: str | None = None, study_uid: str | None = None, frame_uid: str | None = None,
                    description: str = "test CT", modality: str = "CT",
                    positions: np.ndarray | None = None, intercept: float = INTERCEPT) -> list[Path]:
    """Write ``data`` (x, y, z) with RAS ``affine`` as one DICOM file per z slice in ``folder``; returns the files
    in slice order. ``positions`` (n, 3, LPS) overrides the ImagePositionPatient of each slice (tilt/gap tests);
    ``intercept`` is the RescaleIntercept (0: stored values are the HU, no rescaling)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    row_cos = col_step / np.linalg.norm(col_step)  # direction of increasing column index (DICOM's first triplet)
    col_cos = row_step / np.linalg.norm(row_step)
    pixel_spacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
    n = data.shape[2]
    if positions is None:
        positions = np.array([lps[:3, 3] + k * slice_step for k in range(n)])
    stored = np.clip(np.rint(np.asarray(data, dtype=np.float64) - intercept), -32768, 32767).astype(np.int16)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    instance_numbers = rng.permutation(n) + 1
    names = [f"{rng.integers(0, 2**63):x}.dcm" for _ in range(n)]
    files = [folder / name for name in names]
    for k in rng.permutation(n):  # write in shuffled order too
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = "Flare^Test"
        ds.PatientID = "FLARE-TEST"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyID = "1"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = description
        ds.Modality = modality
        ds.Manufacturer = "flare tests"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.SliceThickness = _ds(float(np.linalg.norm(slice_step)))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (rows, columns)
        ds.save_as(files[k], enforce_file_format=True)
    return files
