"""Writing label maps as DICOM Segmentation (DICOM-SEG) objects with highdicom (the ``dicom`` extra).

One segment per FLARE label present, named after the registry (:mod:`flare.runtime.foundation.labels`) and coded with its
SNOMED CT segmented property category / type (with a laterality modifier for the paired organs) and its colour. The
SEG references the source CT series (ReferencedSeriesSequence, and each frame's source image), identifies the
algorithm (flare and its version, family "Artificial Intelligence", AUTOMATIC), is BINARY and uncompressed
(Explicit VR Little Endian: lossless). Empty frames are omitted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation.atomic import write_with
from flare.runtime.foundation.errors import OutputError
from flare.runtime.foundation.labels import LABELS, NUM_FLARE_IDS
from flare.runtime.foundation.version import version
from flare.runtime.image.dicom import highdicom_mod
from flare.runtime.image.model import LoadedImage

__all__ = ["present_labels", "segment_descriptions", "write_dicom_seg"]

SERIES_DESCRIPTION = "flare abdominal CT segmentation"
#: type-2 attributes (may be empty) that a DICOM-SEG copies from the source series: empty when the series lacks them
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
#: the series description of a SEG made with a model trained on synthetic data (a DICOM LO: at most 64 characters)
SYNTHETIC_SERIES_DESCRIPTION = "flare seg - SYNTHETIC-DATA MODEL, NOT FOR CLINICAL USE"


def _coded(hd: Any, code: tuple[str, str]) -> Any:
    return hd.sr.CodedConcept(value=code[0], scheme_designator="SCT", meaning=code[1])


def segment_descriptions(label_ids: list[int]) -> list[Any]:
    """highdicom SegmentDescriptions for FLARE ids ``label_ids`` (segment numbers 1.. in that order)."""
    hd = highdicom_mod.load()
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="flare", family=codes.cid7162.ArtificialIntelligence,
                                                   version=version())
    out = []
    for number, label_id in enumerate(label_ids, start=1):
        label = LABELS[label_id]
        assert label.snomed is not None, f"label {label_id} has no SNOMED coding"
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.name,
            segmented_property_category=_coded(hd, label.snomed.category),
            segmented_property_type=_coded(hd, label.snomed.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_id=f"flare {label.short}", tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*label.color))
        if label.snomed.laterality is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _coded(hd, label.snomed.laterality)]
        out.append(desc)
    return out


def _with_type2(datasets: tuple[Any, ...]) -> list[Any]:
    """Copies of the source headers with every type-2 attribute a SEG copies present (empty where the series lacks
    it, as the standard allows: common after anonymisation)."""
    import copy

    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, None)
        out.append(ds)
    return out


def present_labels(output: Path, labels: np.ndarray, image: LoadedImage, what: str, item: str) -> list[int]:
    """The FLARE ids present in ``labels``, after the checks every DICOM output makes: ``image`` was read from
    DICOM and has ``labels``' shape, the values are FLARE ids, something was segmented (``OutputError`` naming
    ``what``, e.g. ``DICOM-SEG``, and its ``item``, e.g. ``segment``)."""
    if image.source is None:
        raise OutputError(output, f"{what} output needs a DICOM input series (this input is not DICOM); "
                                  "write NIfTI (.nii.gz) instead")
    if tuple(labels.shape) != tuple(image.data.shape):
        raise ValueError(f"labels shape {labels.shape} does not match the image shape {image.data.shape}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= NUM_FLARE_IDS):
        raise ValueError(f"label values {int(labels.min())}..{int(labels.max())} are not FLARE ids")
    present = [int(v) for v in np.unique(labels) if v]
    if not present:
        raise OutputError(output, f"nothing was segmented; a {what} needs at least one {item} (no file written)")
    return present


def write_dicom_seg(output: str | Path, labels: np.ndarray, image: LoadedImage, synthetic_model: bool = False
                    ) -> None:
    """Write ``labels`` (uint8 FLARE ids in ``image``'s voxel grid) as a DICOM-SEG referencing ``image``'s source
    series, atomically; ``synthetic_model`` (the bundle's card says its models were trained on synthetic data)
    puts that into the series description. ``OutputError`` when ``image`` was not read from DICOM, no label is
    present, or the file cannot be written."""
    output = Path(output)
    present = present_labels(output, labels, image, "DICOM-SEG", "segment")
    hd = highdicom_mod.load()
    lut = np.zeros(NUM_FLARE_IDS, dtype=np.uint8)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
    # voxel (column, row, slice) -> frames (slice, row, column): frame k belongs to image.source.datasets[k]
    frames = np.ascontiguousarray(lut[labels.transpose(2, 1, 0)])
    try:
        seg = hd.seg.Segmentation(
            source_images=_with_type2(image.source.datasets), pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(present),
            series_instance_uid=hd.UID(), series_number=int(getattr(image.source.datasets[0], "SeriesNumber", 0)
                                                            or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="flare",
            manufacturer_model_name="flare FLARE23 abdominal CT", software_versions=version(),
            device_serial_number="0",
            series_description=SYNTHETIC_SERIES_DESCRIPTION if synthetic_model else SERIES_DESCRIPTION, content_label="FLARE",
            content_description="FLARE23 abdominal organs and tumor", omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError) as err:
        raise OutputError(output, f"cannot build the DICOM-SEG from the source series ({err})")
    try:
        write_with(output, lambda tmp: seg.save_as(tmp, enforce_file_format=True))
    except OSError as err:
        raise OutputError(output, f"cannot write: {err.strerror or err}")
