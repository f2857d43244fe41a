"""Writing, in one place: a :class:`~flare.runtime.pipeline.result.SegmentResult` becomes the files a run asked for.

The label map (NIfTI in the input's space, or DICOM-SEG referencing the input series), statistics (JSON), the
preview (PNG) and the run report (JSON). Statistics and the preview are computed before the first file is written,
so a failure there leaves no output behind; every file is written atomically
(:mod:`flare.runtime.foundation.atomic`). The time spent writing the label map is the report's ``write`` stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flare.runtime.foundation.atomic import write_bytes_atomic, write_text_atomic
from flare.runtime.pipeline.result import SegmentResult

__all__ = ["Outputs", "write_result"]


@dataclass(frozen=True)
class Outputs:
    """Where one image's outputs go (None: not asked for)."""

    labels: Path
    dicom_seg: bool = False  # the label map as DICOM-SEG (needs an image read from DICOM) instead of NIfTI
    statistics: Path | None = None
    preview: Path | None = None
    report: Path | None = None
    title: str = ""  # the preview's title
    #: what the statistics file says about the input besides the numbers (input path, series UID)
    statistics_header: dict[str, Any] | None = None


def write_result(result: SegmentResult, out: Outputs) -> None:
    """Write ``result`` to ``out``; sets the report's ``write`` stage and ``output``."""
    img, labels, report = result.image, result.labels, result.report
    stats = png = None
    if out.statistics is not None:
        from flare.runtime.ops.stats import label_statistics

        stats = {**(out.statistics_header or {}), "segmentation": str(out.labels),
                 **label_statistics(labels, img.data, img.affine)}
    if out.preview is not None:
        from flare.runtime.app.preview import render_preview

        png = render_preview(img.data, labels, img.affine, title=out.title)
    t0 = time.perf_counter()
    if out.dicom_seg:
        from flare.runtime.image.dicomseg import write_dicom_seg

        write_dicom_seg(out.labels, labels, img)
    else:
        from flare.runtime.image.nifti import write_labels

        write_labels(out.labels, labels, like=img)
    report.stages["write"] = round(time.perf_counter() - t0, 4)
    report.output = str(out.labels)
    if stats is not None and out.statistics is not None:
        write_text_atomic(out.statistics, json.dumps(stats, indent=2) + "\n")
    if png is not None and out.preview is not None:
        write_bytes_atomic(out.preview, png)
    if out.report is not None:
        write_text_atomic(out.report, json.dumps(report.to_json(), indent=2) + "\n")
