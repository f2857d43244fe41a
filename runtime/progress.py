"""Per-stage progress for ``flare-run`` (rich, on stderr)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pipeline import STAGES, Segmenter, StageHooks


def _rich_hooks(progress: Any) -> StageHooks:
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


def run_with_progress(input_path: Path, output: Path, bundle: Path, *, device: str, folds: int | None,
                      overlap: float | None, precision: str | None, quiet: bool,
                      gpu_mem_budget: float | None = None, postprocess: str | None = None) -> dict[str, Any]:
    """Load the bundle, segment ``input_path`` into ``output`` and return the report."""
    seg = Segmenter(bundle, device=device, folds=folds, overlap=overlap, precision=precision,
                    gpu_mem_budget=gpu_mem_budget, postprocess=postprocess)
    if quiet:
        return seg.segment(input_path, output)[2]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    console.print(f"flare-run: bundle {seg.bundle.root} · {len(seg.engines)} fold(s) · device {seg.device} "
                  f"({seg.engines[0].precision}) · models loaded in {seg.load_s:.2f} s")
    columns = (SpinnerColumn(), TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        report = seg.segment(input_path, output, hooks=_rich_hooks(progress))[2]
    stages = ", ".join(f"{k} {report['stages'][k]:.2f}" for k in STAGES)
    console.print(f"flare-run: wrote {output} in {report['total_s']:.2f} s ({stages})")
    return report
