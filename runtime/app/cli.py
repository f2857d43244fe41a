"""``flare-run``: segment CTs (NIfTI files, DICOM series, folders of cases) with a bundle, torch-free.

The command is three steps, each its own function: the options become a :class:`~flare.runtime.app.plan.Plan` (the
cases and every output path, all checked before any work), the bundle is loaded once, and
:func:`~flare.runtime.app.batch.run_plan` segments the cases.

Exit codes: 0 success; 2 nothing could start (bad input, bundle or output: one line on stderr, no traceback, no
output file) or, with one INPUT image, that image failed; 3 several cases were given and some failed (the others
are written, ``OUT/summary.json`` names the failures); 130 interrupted (SIGINT), 143 SIGTERM, 129 SIGHUP (128 + signal:
temporary files removed, no partial output).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from flare.runtime.app.plan import OutputFormat, Plan
from flare.runtime.foundation.errors import FlareError, InputError
from flare.runtime.foundation.lifecycle import Terminated
from flare.runtime.ops.postprocessing import Mode

if TYPE_CHECKING:
    from flare.runtime.pipeline.segmenter import Segmenter
    from flare.runtime.serving.client import RemoteSegmenter

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Segment abdominal CTs (13 FLARE23 organs + tumor) with an exported flare bundle.")

EXIT_OK, EXIT_CANNOT_START, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def _fail(message: str, code: int = EXIT_CANNOT_START) -> typer.Exit:
    typer.echo(f"flare-run: error: {message}", err=True)
    return typer.Exit(code)


def _setup_logging(quiet: bool) -> None:
    from flare.runtime.foundation.lifecycle import StderrHandler

    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("flare-run: warning: %(message)s"))
    logger = logging.getLogger("flare.runtime")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def _show_version(value: bool) -> None:
    if value:
        from flare.runtime.app.entrypoints import version

        typer.echo(f"flare-run {version()}")
        raise typer.Exit(0)


def _check_extras(plan: Plan) -> None:
    """The optional packages the plan needs (preview: matplotlib; DICOM: pydicom, highdicom), before any work."""
    from flare.runtime.app.entrypoints import need

    reqs = []
    if any(job.preview is not None for job in plan.jobs):
        reqs.append(("matplotlib", "preview"))
    if any(job.case.kind == "dicom" for job in plan.jobs):
        reqs.append(("pydicom", "dicom"))
    if plan.fmt is OutputFormat.dicom_seg:
        reqs.append(("highdicom", "dicom"))
    message = need(reqs)
    if message is not None:
        raise InputError(None, f"this run {message}")


def _run_plan(plan: Plan, seg: Segmenter, quiet: bool) -> int:
    from flare.runtime.app.batch import run_plan
    from flare.runtime.app.progress import run_display

    extra = {"bundle": str(seg.bundle.root), "device": seg.device, "format": plan.fmt.value}
    with run_display(plan, seg, quiet) as display:
        results = run_plan(plan, seg, hooks_for=display.hooks_for, on_done=display.on_done, summary_extra=extra)
    failed = [r for r in results if r.status != "ok"]
    if not plan.folder_mode:
        if failed:
            raise _fail(failed[0].error or "failed")
        return EXIT_OK
    if not quiet:
        typer.echo(f"flare-run: {len(results) - len(failed)} of {len(results)} cases written to {plan.out_dir}; "
                   f"summary: {plan.summary_path}", err=True)
    if failed:
        names = ", ".join(r.name for r in failed)
        typer.echo(f"flare-run: {len(failed)} case(s) failed: {names}", err=True)
        return EXIT_SOME_FAILED
    return EXIT_OK


def _note_default_precision(seg: Segmenter | RemoteSegmenter) -> None:
    """One line on stderr when the CPU default picked the bundle's int8 models (so a user comparing with an fp32
    run knows why the numbers differ slightly)."""
    engines = getattr(seg, "engines", None)
    if engines and engines[0].precision == "int8":
        typer.echo("flare-run: note: using the bundle's int8 models on the CPU (verified against fp32 at export; "
                   "--precision fp32 for the fp32 models)", err=True)


@contextmanager
def _exit_on_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP end the command with one line and exit 130 / 128 + signal."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("flare-run: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated as sig:
        typer.echo(f"flare-run: {sig}", err=True)
        raise typer.Exit(sig.exit_code) from None


@app.command()
def run(
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...",
        help="CT images: NIfTI files (.nii.gz, .nii; any orientation, HU), DICOM series folders, single .dcm files, "
             "or folders of cases (NIfTI files and/or DICOM series, searched recursively).", show_default=False)],
    output: Annotated[Path | None, typer.Option("-o", "--output",
                      help="One image: the label map to write (.nii.gz/.nii NIfTI, .dcm DICOM-SEG; default "
                           "INPUT_seg.nii.gz beside the input). Several cases: a folder (created) that gets "
                           "CASE.nii.gz (or CASE.dcm) per case and summary.json.", show_default=False)] = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b",
                      help="Bundle folder. Default: $FLARE_BUNDLE, else ~/.cache/flare/bundle.",
                      show_default=False)] = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when ONNX Runtime has it.")] = Device.auto,
    folds: Annotated[int | None, typer.Option(min=1, help="Use the first N folds (default: all).",
                                              show_default=False)] = None,
    overlap: Annotated[float | None, typer.Option(min=0.0, max=0.95,
                       help="Tile overlap ratio; > 0 blends tiles with Gaussian weights (default: bundle's, 0).",
                       show_default=False)] = None,
    precision: Annotated[Precision | None, typer.Option(help="Model precision (default: fp16 on CUDA, int8 on the "
                                                             "CPU, when the bundle has it; else fp32).",
                                                        show_default=False)] = None,
    gpu_mem_budget: Annotated[float, typer.Option(min=500.0,
                              help="GPU memory budget in MB: picks the tile size; OOM retries smaller, then CPU.")
                              ] = 4000.0,
    cudnn_algo_search: Annotated[str, typer.Option(help="CUDA: cuDNN convolution algorithm search, HEURISTIC "
                                 "(fast start) or EXHAUSTIVE (benchmarks each conv on the first tile).")
                                 ] = "HEURISTIC",
    postprocess: Annotated[Mode | None, typer.Option(
                           help="Clean-up rules: paper (tumor dropped when its total is under 100 mm³; liver, kidneys, "
                                "spleen, pancreas, aorta each keep their largest run of z slices) or strict (largest "
                                "3-D components, small tumor components). Default: the bundle's, paper.",
                           show_default=False)] = None,
    fmt: Annotated[OutputFormat | None, typer.Option("--format",
                   help="Output format (several cases; one image: from the -o suffix). dicom-seg needs DICOM "
                        "input. Default: nifti.", show_default=False)] = None,
    series: Annotated[str | None, typer.Option("--series", help="Segment only the DICOM series with this "
                                               "SeriesInstanceUID.", show_default=False)] = None,
    statistics: Annotated[Path | None, typer.Option("--statistics", help="Per-label voxels, volume (ml), mean/std "
                          "HU and the tumor count as JSON: a file for one image, a folder for several "
                          "(CASE_stats.json).", show_default=False)] = None,
    preview: Annotated[Path | None, typer.Option("--preview", help="PNG of axial/coronal/sagittal overlays: a "
                       "file for one image, a folder for several (CASE_preview.png). Needs matplotlib "
                       "(extra 'preview').", show_default=False)] = None,
    report: Annotated[Path | None, typer.Option(help="Run report as JSON (stages, crop, tiles, memory, voxels): "
                      "a file for one image, a folder for several (CASE_report.json).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    server: Annotated[str | None, typer.Option(help="Segment on a flare-serve server at HOST:PORT (its HTTP port) "
                      "instead of here; --bundle, --device, --precision and --gpu-mem-budget are the server's.")
                      ] = None,
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Segment each INPUT and write its label map in the input's own space (shape, affine, header)."""
    _setup_logging(quiet)
    with _exit_on_signals():
        try:
            from flare.runtime.app.plan import make_plan

            plan = make_plan(inputs, output=output, fmt=fmt, series=series, statistics=statistics, preview=preview,
                             report=report)
            _check_extras(plan)
            from flare.runtime.bundle.manifest import default_bundle_dir
            from flare.runtime.pipeline.limits import preflight
            from flare.runtime.pipeline.segmenter import Segmenter

            seg: Segmenter | RemoteSegmenter
            if server is not None:  # flare-serve: the cases are read and written here, segmented there
                from flare.runtime.serving.client import RemoteSegmenter

                seg = RemoteSegmenter(server, folds=folds, overlap=overlap, progress=not quiet,
                                      postprocess=None if postprocess is None else postprocess.value)
            else:
                if not plan.folder_mode and plan.jobs[0].case.kind == "nifti":  # refuse from the header before loading
                    preflight(plan.jobs[0].case.source, bundle or default_bundle_dir())
                seg = Segmenter(bundle or default_bundle_dir(), device=device.value, folds=folds, overlap=overlap,
                                precision=None if precision is None else precision.value, gpu_mem_budget=gpu_mem_budget,
                                postprocess=None if postprocess is None else postprocess.value,
                                cudnn_algo_search=cudnn_algo_search.upper())
            plan.create_folders()
            if precision is None and not quiet:
                _note_default_precision(seg)
        except FlareError as err:
            raise _fail(str(err)) from None
        except MemoryError:
            raise _fail("out of memory while loading the bundle") from None
    with _exit_on_signals():
        code = _run_plan(plan, seg, quiet or server is not None)  # type: ignore[arg-type]  # duck-typed remote
    raise typer.Exit(code)


def main() -> None:
    from flare.runtime.foundation.lifecycle import guard_stderr, install_signal_handlers

    guard_stderr()
    install_signal_handlers()
    app()


if __name__ == "__main__":
    main()
