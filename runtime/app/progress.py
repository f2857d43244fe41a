"""Progress of ``flare-run`` on stderr (rich): per stage for one case, a bar over cases for several."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flare.runtime.app.batch import CaseResult
from flare.runtime.app.plan import CaseJob, Plan
from flare.runtime.pipeline.result import STAGES
from flare.runtime.pipeline.segmenter import Segmenter, StageHooks

__all__ = ["Display", "run_display"]


def _rich_hooks(progress: Any) -> StageHooks:
    """One progress row per stage (file mode)."""
    tasks: dict[str, Any] = {}

    def start(name: str) -> None:
        tasks[name] = progress.add_task(name, total=None)

    def end(name: str, seconds: float) -> None:
        total = progress.tasks[tasks[name]].total or 1
        progress.update(tasks[name], total=total, completed=total, description=f"{name} {seconds:.2f} s")

    def total(n: int) -> None:
        progress.update(tasks["infer"], total=n, completed=0)

    def done(n: int) -> None:
        progress.advance(tasks["infer"], n)

    return StageHooks(start, end, total, done)


def _case_hooks(progress: Any, task: Any, name: str) -> StageHooks:
    """One row that shows the current case's stage and its tiles (folder mode)."""

    def start(stage: str) -> None:
        progress.update(task, description=f"{name}: {stage}", total=None, completed=0)

    def total(n: int) -> None:
        progress.update(task, total=n, completed=0)

    def done(n: int) -> None:
        progress.advance(task, n)

    return StageHooks(start, lambda stage, seconds: None, total, done)


class Display:
    """What :func:`flare.runtime.app.batch.run_plan` calls back: hooks per case and a line per finished case."""

    def __init__(self, hooks_for: Callable[[CaseJob], StageHooks | None],
                 on_done: Callable[[CaseResult], None]) -> None:
        self.hooks_for, self.on_done = hooks_for, on_done


def _err(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


@contextmanager
def run_display(plan: Plan, seg: Segmenter, quiet: bool) -> Iterator[Display]:
    """Progress for ``plan`` (nothing but failures with ``quiet``; file mode's failure is the caller's to print)."""

    def failed(result: CaseResult) -> None:
        if plan.folder_mode and result.status != "ok":
            _err(f"flare-run: error: {result.name}: {result.error}")

    if quiet:
        yield Display(lambda job: None, failed)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, soft_wrap=True)
    first = seg.engines[0]
    console.print(f"flare-run: bundle {seg.bundle.root} · {len(seg.engines)} fold(s) · device {seg.device} "
                  f"({first.precision}, {first.backend}) · models loaded in {seg.load_s:.2f} s")
    for line in plan.skipped:
        console.print(f"flare-run: {line}", markup=False, highlight=False)
    columns = [SpinnerColumn(), TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    if not plan.folder_mode:
        def wrote(result: CaseResult) -> None:
            if result.status == "ok" and result.stages is not None:
                stages = ", ".join(f"{k} {result.stages[k]:.2f}" for k in STAGES)
                console.print(f"flare-run: wrote {result.output} in {result.seconds:.2f} s ({stages})",
                              markup=False, highlight=False)

        with Progress(*columns, console=console, transient=False) as progress:
            yield Display(lambda job: _rich_hooks(progress), wrote)
        return
    columns.append(TimeRemainingColumn())
    console.print(f"flare-run: {len(plan.jobs)} cases → {plan.out_dir}")
    with Progress(*columns, console=console, transient=True) as progress:
        cases = progress.add_task("cases", total=len(plan.jobs))
        stage = progress.add_task("", total=None)

        def done(result: CaseResult) -> None:
            progress.advance(cases)
            if result.status == "ok":
                progress.console.print(f"  ok     {result.name}  {result.seconds:.1f} s → {result.output}",
                                       markup=False, highlight=False)
            else:
                progress.console.print(f"  FAILED {result.name}: {result.error}", markup=False, highlight=False)

        yield Display(lambda job: _case_hooks(progress, stage, job.case.name), done)

