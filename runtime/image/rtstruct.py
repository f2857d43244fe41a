"""Writing label maps as DICOM RT Structure Sets (RTSTRUCT) for radiotherapy planning systems, with rt-utils (the
``dicom`` extra; highdicom writes SEG but not RTSTRUCT).

One ROI per FLARE label present, named after the registry's TotalSegmentator-style name (``liver``,
``kidney_right``, ...), coloured with the registry's colour; contours are the label's outlines on each CT slice
(rt-utils: OpenCV contours of the binary mask, slice by slice). The structure set references the source series
(frame of reference, each contour's image) and copies the patient/study of the CT. Masks are matched to the slices
by SOPInstanceUID, so the order in which rt-utils sorts the slices does not matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flare.runtime.foundation.atomic import write_with
from flare.runtime.foundation.errors import OutputError
from flare.runtime.foundation.labels import LABELS
from flare.runtime.image.dicomseg import present_labels
from flare.runtime.image.nifti import LoadedImage
from flare.runtime.inference.device import lazy_import

__all__ = ["ROI_NAMES", "write_rtstruct"]

rt_utils_mod = lazy_import("rt_utils", "dicom")
#: ROI name of each FLARE id in the structure set
ROI_NAMES = {lab.id: lab.file for lab in LABELS[1:]}
SERIES_DESCRIPTION = "flare abdominal CT structures"
SYNTHETIC_SERIES_DESCRIPTION = "flare RTSTRUCT - SYNTHETIC-DATA MODEL, NOT FOR CLINICAL USE"


def write_rtstruct(output: str | Path, labels: np.ndarray, image: LoadedImage, synthetic_model: bool = False
                   ) -> None:
    """Write ``labels`` (uint8 FLARE ids in ``image``'s voxel grid) as an RTSTRUCT referencing ``image``'s source
    series, atomically. ``OutputError`` when ``image`` was not read from DICOM, nothing was segmented, or the
    file cannot be written."""
    output = Path(output)
    present = present_labels(output, labels, image, "RTSTRUCT", "ROI")
    assert image.source is not None
    rt = rt_utils_mod.load()
    from rt_utils import ds_helper, image_helper

    ours = {ds.SOPInstanceUID: k for k, ds in enumerate(image.source.datasets)}
    series = sorted(image.source.datasets, key=image_helper.get_slice_position)
    order = [ours[ds.SOPInstanceUID] for ds in series]  # rt-utils slice j is our slice order[j]
    try:
        struct = rt.RTStruct(list(series), ds_helper.create_rtstruct_dataset(list(series)))
        struct.set_series_description(SYNTHETIC_SERIES_DESCRIPTION if synthetic_model else SERIES_DESCRIPTION)
        for label_id in present:
            # rt-utils masks are (rows, columns, slices); our voxels are (column, row, slice)
            mask = np.ascontiguousarray((labels[:, :, order] == label_id).transpose(1, 0, 2))
            struct.add_roi(mask=mask, color=list(LABELS[label_id].color), name=ROI_NAMES[label_id],
                           description=LABELS[label_id].name)
    except Exception as err:  # noqa: BLE001 - rt-utils raises plain Exceptions for geometry problems
        raise OutputError(output, f"cannot build the RTSTRUCT from the source series ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    try:
        write_with(output, lambda tmp: struct.ds.save_as(tmp, enforce_file_format=True))
    except OSError as err:
        raise OutputError(output, f"cannot write: {err.strerror or err}") from None
