"""Writing, in one place: a :class:`~flare.runtime.pipeline.result.SegmentResult` becomes the files a run asked for.

The label map (NIfTI in the input's space, or DICOM-SEG / RTSTRUCT referencing the input series), one mask per label
and viewer label tables when asked, statistics (JSON), the preview (PNG) and the run report (JSON). Statistics and the preview are computed before the first file is written,
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
from flare.runtime.foundation.lifecycle import pause_point
from flare.runtime.pipeline.result import SegmentResult

__all__ = ["Outputs", "write_result"]


@dataclass(frozen=True)
class Outputs:
    """Where one image's outputs go (None: not asked for)."""

    labels: Path
    dicom_seg: bool = False  # the label map as DICOM-SEG (needs an image read from DICOM) instead of NIfTI
    rtstruct: bool = False  # the label map as DICOM RTSTRUCT (needs an image read from DICOM) instead of NIfTI
    statistics: Path | None = None
    preview: Path | None = None
    report: Path | None = None
    title: str = ""  # the preview's title
    #: what the statistics file says about the input besides the numbers (input path, series UID)
    statistics_header: dict[str, Any] | None = None
    roi_subset: tuple[int, ...] | None = None  # FLARE ids kept in every output (others set to 0); None: all
    masks: Path | None = None  # a folder for one mask file per label (TotalSegmentator names)
    tables: tuple[Path, ...] = ()  # label tables for viewers (3D Slicer colour table, ITK-SNAP labels)


def _paths(out: Outputs) -> list[Path]:
    """Every file :func:`write_result` writes for ``out``."""
    from flare.runtime.app.label_outputs import mask_paths

    masks = [] if out.masks is None else list(mask_paths(out.masks, out.roi_subset).values())
    return [p for p in (out.labels, out.statistics, out.preview, out.report, *out.tables, *masks) if p is not None]


def _version(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def write_result(result: SegmentResult, out: Outputs) -> None:
    """Write ``result`` to ``out``; sets the report's ``write`` stage and ``output``. All or nothing: when the
    writing stops part-way (Ctrl-C, SIGTERM, a full disk), the files it already wrote for this case are removed."""
    before = {p: _version(p) for p in _paths(out)}
    try:
        _write_result(result, out)
    except BaseException:
        for path, version in before.items():
            if _version(path) != version:  # written by this call (a new file, or replaced by the atomic rename)
                path.unlink(missing_ok=True)
        raise


def _write_result(result: SegmentResult, out: Outputs) -> None:
    from flare.runtime.pipeline.segmenter import rss_peak_mb

    img, labels, report = result.image, result.labels, result.report
    if out.roi_subset is not None:
        from flare.runtime.app.label_outputs import keep_only
        from flare.runtime.ops.stats import label_volumes

        labels = result.labels = keep_only(labels, out.roi_subset)
        report.roi_subset = list(out.roi_subset)
        report.voxels, report.volume_ml = label_volumes(labels, img.affine)
    stats = png = None
    if out.statistics is not None:
        from flare.runtime.ops.stats import label_statistics

        stats = {**(out.statistics_header or {}), "segmentation": str(out.labels),
                 **label_statistics(labels, img.data, img.affine)}
    if out.preview is not None:
        from flare.runtime.app.preview import render_preview

        png = render_preview(img.data, labels, img.affine, title=out.title)
    if stats is not None or png is not None:  # they allocate too: the peak is sampled after them
        report.rss_peak_mb = max(report.rss_peak_mb or 0.0, round(rss_peak_mb(), 1))
    synthetic = bool((report.model_card or {}).get("warning"))
    t0 = time.perf_counter()
    if out.dicom_seg:
        from flare.runtime.image.dicomseg import write_dicom_seg

        write_dicom_seg(out.labels, labels, img, synthetic_model=synthetic)
    elif out.rtstruct:
        from flare.runtime.image.rtstruct import write_rtstruct

        write_rtstruct(out.labels, labels, img, synthetic_model=synthetic)
    else:
        from flare.runtime.image.nifti import write_labels

        write_labels(out.labels, labels, like=img)
    pause_point("write:labels")  # test hook (FLARE_TEST_PAUSE_AT): the label map is written, the rest is not
    if out.masks is not None:
        from flare.runtime.app.label_outputs import write_masks

        report.masks = [str(p) for p in write_masks(out.masks, labels, img, out.roi_subset)]
    if out.tables:
        from flare.runtime.app.label_outputs import write_label_tables

        write_label_tables(out.tables)
    report.stages["write"] = round(time.perf_counter() - t0, 4)
    report.output = str(out.labels)
    if stats is not None and out.statistics is not None:
        write_text_atomic(out.statistics, json.dumps(stats, indent=2) + "\n")
    if png is not None and out.preview is not None:
        write_bytes_atomic(out.preview, png)
    if out.report is not None:
        write_text_atomic(out.report, json.dumps(report.to_json(), indent=2) + "\n")
