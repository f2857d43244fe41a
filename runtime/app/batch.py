"""Run a :class:`~flare.runtime.app.plan.Plan`: one :class:`~flare.runtime.pipeline.segmenter.Segmenter` (models loaded once) for
every case, the next case read in a background thread while the current one is segmented (a prefetch of depth 1),
each case's outputs written by :mod:`flare.runtime.app.write`, a failing case recorded and skipped, and in folder mode ``OUT/summary.json``
rewritten atomically as cases finish — at most every :data:`SUMMARY_EVERY_S` seconds, and at the end or when the run is
interrupted (rewriting it after each of thousands of quick cases made a batch quadratic in its size).

Every case is read through the same header preflight as a single file (the Segmenter's limits, or, for a remote
segmenter, the limits that need no bundle) before a voxel is decoded. The read-ahead thread is a daemon: a
termination signal never waits for it. A summary that cannot be written (a full disk) stops the run with
:class:`SummaryError` (the CLI prints one line and exits 3); a case whose outputs cannot be written is a failed case.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from flare.runtime.app.plan import CaseJob, OutputFormat, Plan
from flare.runtime.foundation.errors import FlareError, OutputError

if TYPE_CHECKING:
    from flare.runtime.image.model import LoadedImage
    from flare.runtime.pipeline.result import Report
    from flare.runtime.pipeline.segmenter import Segmenter, StageHooks

__all__ = ["CaseResult", "SummaryError", "process_case", "run_plan", "write_summary"]


class SummaryError(OutputError):
    """``OUT/summary.json`` cannot be written (e.g. the disk is full): the run stops."""


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
    stages: dict[str, float] | None = None  # seconds per pipeline stage (see flare.runtime.pipeline.result.STAGES)


Preflight = Callable[..., None]


def _read(job: CaseJob, preflight: Preflight) -> tuple[LoadedImage, float]:
    from flare.runtime.foundation.lifecycle import pause_point

    t0 = time.perf_counter()
    pause_point(f"read:{job.case.name}")  # test hook (FLARE_TEST_PAUSE_AT); a no-op otherwise
    return job.case.read(preflight), time.perf_counter() - t0


def _read_ahead(job: CaseJob, preflight: Preflight) -> Future:
    """Read ``job``'s image in a daemon thread (the process can exit without waiting for it)."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(_read(job, preflight))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            future.set_exception(err)

    threading.Thread(target=work, name="flare-read", daemon=True).start()
    return future


def _preflight(seg: Any) -> Preflight:
    """The Segmenter's header check (grids for its bundle), or the bundle-free one for a remote segmenter."""
    check = getattr(seg, "check_grids", None)
    if check is not None:
        return check  # type: ignore[no-any-return]
    from flare.runtime.pipeline.limits import check_source

    return check_source


def process_case(seg: Segmenter, job: CaseJob, img: LoadedImage, fmt: OutputFormat,
                 hooks: StageHooks | None = None, read_s: float = 0.0,
                 roi_subset: tuple[int, ...] | None = None) -> Report:
    """Segment ``img`` and write the job's outputs (:func:`flare.runtime.app.write.write_result`); returns the run
    report (``read_s``: seconds it took to read ``img``, added to the report's read stage; ``roi_subset``: the FLARE ids kept, others set to 0)."""
    from flare.runtime.app.write import Outputs, write_result

    result = seg.segment(img, hooks)
    result.report.add_stage_time("read", read_s)
    write_result(result, Outputs(job.output, dicom_seg=fmt is OutputFormat.dicom_seg,
                                 rtstruct=fmt is OutputFormat.rtstruct, statistics=job.statistics,
                                 preview=job.preview, report=job.report, title=job.case.name,
                                 statistics_header={"input": str(job.case.source),
                                                    "series_uid": job.case.series_uid},
                                 roi_subset=roi_subset, masks=job.masks, tables=tuple(job.tables or ())))
    return result.report


SUMMARY_EVERY_S = 5.0


class _Summary:
    """``OUT/summary.json`` kept up to date without rewriting it after every case: :meth:`update` writes when
    :data:`SUMMARY_EVERY_S` have passed since the last write (or when every case is done), :meth:`flush` always."""

    def __init__(self, plan: Plan, extra: dict[str, Any]) -> None:
        self.plan, self.extra, self.last = plan, extra, time.monotonic()
        self.results: list[CaseResult] | None = None  # not written yet

    def update(self, results: list[CaseResult]) -> None:
        self.results = results
        if len(results) == len(self.plan.jobs) or time.monotonic() - self.last >= SUMMARY_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.results is not None:
            write_summary(self.plan, self.results, self.extra)
            self.results, self.last = None, time.monotonic()


def write_summary(plan: Plan, results: list[CaseResult], extra: dict[str, Any]) -> None:
    """``OUT/summary.json`` (folder mode only), atomically."""
    if plan.summary_path is None:
        return
    from flare.runtime.foundation.atomic import write_text_atomic

    doc = {**extra, "cases_total": len(plan.jobs), "ok": sum(r.status == "ok" for r in results),
           "failed": sum(r.status == "failed" for r in results), "pending": len(plan.jobs) - len(results),
           "cases": [asdict(r) for r in results]}
    try:
        write_text_atomic(plan.summary_path, json.dumps(doc, indent=2) + "\n")
    except (OutputError, OSError) as err:
        problem = err.problem if isinstance(err, OutputError) else f"cannot write: {err.strerror or err}"
        last = f"; the last case, {results[-1].name}, {results[-1].status}" if results else ""
        raise SummaryError(plan.summary_path, f"{problem}{last}; the run stopped with "
                                              f"{len(plan.jobs) - len(results)} case(s) not run") from None


def _interrupt_in(err: BaseException) -> BaseException | None:
    """A ``KeyboardInterrupt`` or termination signal that ``err`` was raised from (Python's class creation turns
    one raised during an import into ``RuntimeError: Error calling __set_name__``), else None."""
    from flare.runtime.app.process import Terminated

    seen: BaseException | None = err
    for _ in range(16):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if seen is None:
            return None
        if isinstance(seen, (KeyboardInterrupt, Terminated)):
            return seen
    return None


def _error_line(err: BaseException) -> str:
    if isinstance(err, FlareError):
        return str(err)
    if isinstance(err, MemoryError):
        return "out of memory"
    return " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever the exception says


def _run_job(seg: Segmenter, plan: Plan, job: CaseJob, loaded: Callable[[], tuple[LoadedImage, float]],
             hooks: StageHooks | None) -> CaseResult:
    """One case: read (``loaded()``), segment, write; a failure is recorded in the result, never raised."""
    t0 = time.perf_counter()
    result = CaseResult(job.case.name, str(job.case.source), job.case.series_uid, str(job.output), "ok", 0.0)
    try:
        img, read_s = loaded()
        result.stages = process_case(seg, job, img, plan.fmt, hooks, read_s=read_s,
                                     roi_subset=plan.roi_subset).stages
        del img
        result.statistics = None if job.statistics is None else str(job.statistics)
        result.preview = None if job.preview is None else str(job.preview)
        result.report = None if job.report is None else str(job.report)
    except Exception as err:  # noqa: BLE001 - one case's failure (MemoryError too) must not stop the others
        interrupt = _interrupt_in(err)
        if interrupt is not None:  # Ctrl-C inside a library that wrapped it (a lazy import): still an interruption
            raise interrupt from None
        result.status, result.error = "failed", _error_line(err)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def run_plan(plan: Plan, seg: Segmenter, *, hooks_for: Callable[[CaseJob], StageHooks | None] = lambda job: None,
             on_done: Callable[[CaseResult], None] = lambda result: None,
             summary_extra: dict[str, Any] | None = None, concurrency: int = 1) -> list[CaseResult]:
    """Segment every job of ``plan`` with ``seg``; never raises for one case's problem (it is recorded with a
    one-line error and the next case runs). ``KeyboardInterrupt`` stops the run (the summary so far is kept); a summary
    that cannot be written raises :class:`SummaryError`.

    ``concurrency`` > 1 (``flare-run --server``: the work is on the servers) keeps that many cases in flight, each
    read, sent and written by its own thread; the results and the summary stay in the plan's order."""
    extra = {} if summary_extra is None else summary_extra  # the caller may add to it during the run
    preflight = _preflight(seg)
    if concurrency > 1:
        return _run_concurrently(plan, seg, concurrency, preflight, on_done, extra)
    results: list[CaseResult] = []
    jobs = plan.jobs
    summary = _Summary(plan, extra)
    upcoming: Future | None = _read_ahead(jobs[0], preflight) if jobs else None
    try:
        for i, job in enumerate(jobs):
            current = upcoming
            upcoming = _read_ahead(jobs[i + 1], preflight) if i + 1 < len(jobs) else None  # overlaps this case
            assert current is not None
            result = _run_job(seg, plan, job, current.result, hooks_for(job))
            results.append(result)
            summary.update(list(results))  # before on_done: an interruption there keeps this case in the summary
            on_done(result)
    finally:  # an interruption keeps what was done
        summary.flush()
    return results


def _run_concurrently(plan: Plan, seg: Segmenter, concurrency: int, preflight: Preflight,
                      on_done: Callable[[CaseResult], None], extra: dict[str, Any]) -> list[CaseResult]:
    from concurrent.futures import as_completed

    done: dict[int, CaseResult] = {}
    summary = _Summary(plan, extra)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flare-case")
    try:
        futures = {pool.submit(_run_job, seg, plan, job, lambda job=job: _read(job, preflight), None): i  # type: ignore[misc]
                   for i, job in enumerate(plan.jobs)}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            summary.update([done[i] for i in sorted(done)])
            on_done(done[futures[future]])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        summary.flush()
    return [done[i] for i in sorted(done)]
