"""Run a :class:`~flare.runtime.app.plan.Plan`: one :class:`~flare.runtime.pipeline.segmenter.Segmenter` (models loaded once) for
every case, the next case read in a background thread while the current one is segmented (a prefetch of depth 1),
each case's outputs written atomically, a failing case recorded and skipped, and in folder mode ``OUT/summary.json``
rewritten atomically after every case.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from flare.runtime.app.plan import CaseJob, OutputFormat, Plan
from flare.runtime.foundation.errors import FlareError

if TYPE_CHECKING:
    from flare.runtime.image.nifti import LoadedImage
    from flare.runtime.pipeline.segmenter import Segmenter, StageHooks

__all__ = ["CaseResult", "process_case", "run_plan", "write_summary"]


@dataclass
class CaseResult:
    name: str
    input: str
    series_uid: str | None
    output: str
    status: str  # "ok" or "failed"
    seconds: float
    error: str | None = None
    statistics: str | None = None
    preview: str | None = None
    report: str | None = None
    stages: dict[str, float] | None = None  # seconds per pipeline stage (see flare.runtime.pipeline.segmenter.STAGES)


def _read(job: CaseJob) -> tuple[LoadedImage, float]:
    t0 = time.perf_counter()
    return job.case.read(), time.perf_counter() - t0


def process_case(seg: Segmenter, job: CaseJob, img: LoadedImage, fmt: OutputFormat,
                 hooks: StageHooks | None = None, read_s: float = 0.0) -> dict[str, Any]:
    """Segment ``img`` and write the job's outputs; returns the run report (``read_s``: seconds it took to read
    ``img``, added to the report's read stage). Statistics and the preview are computed before the first file is
    written, so a failure there leaves no output behind."""
    labels, affine, report = seg.segment(img, None, hooks)
    report["stages"]["read"] = round(report["stages"]["read"] + read_s, 4)
    stats = png = None
    if job.statistics is not None:
        from flare.runtime.ops.stats import label_statistics

        stats = {"input": str(job.case.source), "series_uid": job.case.series_uid, "segmentation": str(job.output),
                 **label_statistics(labels, img.data, affine)}
    if job.preview is not None:
        from flare.runtime.app.preview import render_preview

        png = render_preview(img.data, labels, affine, title=job.case.name)
    t0 = time.perf_counter()
    if fmt is OutputFormat.dicom_seg:
        from flare.runtime.image.dicomseg import write_dicom_seg

        write_dicom_seg(job.output, labels, img)
    else:
        from flare.runtime.image.nifti import write_labels

        write_labels(job.output, labels, like=img)
    report["stages"]["write"] = round(time.perf_counter() - t0, 4)
    report["output"] = str(job.output)
    if stats is not None and job.statistics is not None:
        from flare.runtime.ops.stats import write_statistics

        write_statistics(job.statistics, stats)
    if png is not None and job.preview is not None:
        from flare.runtime.app.preview import write_preview

        write_preview(job.preview, png)
    if job.report is not None:
        from flare.runtime.foundation.atomic import write_text_atomic

        write_text_atomic(job.report, json.dumps(report, indent=2) + "\n")
    return report


def write_summary(plan: Plan, results: list[CaseResult], extra: dict[str, Any]) -> None:
    """``OUT/summary.json`` (folder mode only), atomically."""
    if plan.summary_path is None:
        return
    from flare.runtime.foundation.atomic import write_text_atomic

    doc = {**extra, "cases_total": len(plan.jobs), "ok": sum(r.status == "ok" for r in results),
           "failed": sum(r.status == "failed" for r in results), "pending": len(plan.jobs) - len(results),
           "cases": [asdict(r) for r in results]}
    write_text_atomic(plan.summary_path, json.dumps(doc, indent=2) + "\n")


def _error_line(err: BaseException) -> str:
    if isinstance(err, FlareError):
        return str(err)
    if isinstance(err, MemoryError):
        return "out of memory"
    return " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever the exception says


def run_plan(plan: Plan, seg: Segmenter, *, hooks_for: Callable[[CaseJob], StageHooks | None] = lambda job: None,
             on_done: Callable[[CaseResult], None] = lambda result: None,
             summary_extra: dict[str, Any] | None = None) -> list[CaseResult]:
    """Segment every job of ``plan`` with ``seg``; never raises for one case's problem (it is recorded with a
    one-line error and the next case runs). ``KeyboardInterrupt`` stops the run (the summary so far is kept)."""
    results: list[CaseResult] = []
    extra = dict(summary_extra or {})
    jobs = plan.jobs
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flare-read")
    upcoming: Future | None = pool.submit(_read, jobs[0]) if jobs else None
    try:
        for i, job in enumerate(jobs):
            t0 = time.perf_counter()
            current = upcoming
            upcoming = pool.submit(_read, jobs[i + 1]) if i + 1 < len(jobs) else None  # overlaps this case
            result = CaseResult(job.case.name, str(job.case.source), job.case.series_uid, str(job.output), "ok", 0.0)
            try:
                assert current is not None
                img, read_s = current.result()
                result.stages = process_case(seg, job, img, plan.fmt, hooks_for(job), read_s=read_s)["stages"]
                del img
                result.statistics = None if job.statistics is None else str(job.statistics)
                result.preview = None if job.preview is None else str(job.preview)
                result.report = None if job.report is None else str(job.report)
            except Exception as err:  # noqa: BLE001 - one case's failure (MemoryError too) must not stop the others
                result.status, result.error = "failed", _error_line(err)
            result.seconds = round(time.perf_counter() - t0, 3)
            results.append(result)
            write_summary(plan, results, extra)
            on_done(result)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # interrupted: do not start another read
    return results
