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
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from flare.runtime.app.plan import BESIDE_OUTPUT, NIFTI_SUFFIXES, OutputFormat, Plan
from flare.runtime.app.process import exit_on_signals
from flare.runtime.foundation.errors import FlareError, InputError
from flare.runtime.inference.engine_names import CpuEngine, CudnnAlgoSearch
from flare.runtime.inference.memory_plan import DEFAULT_BUDGET_MB
from flare.runtime.inference.tiling import MAX_OVERLAP
from flare.runtime.ops.postprocessing import Mode

if TYPE_CHECKING:
    from flare.runtime.pipeline.segmenter import Segmenter
    from flare.runtime.serving.client import RemoteSegmenter

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Segment abdominal CTs (13 FLARE23 organs + tumor) with an exported flare bundle.")

EXIT_OK, EXIT_CANNOT_START, EXIT_SOME_FAILED = 0, 2, 3


class Device(str, Enum):
    """flare-bench's --device choices (flare-run's --device also takes gpu, cuda:N and gpu:N: a plain string
    checked by :func:`flare.runtime.inference.device.parse_device`)."""

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
    from flare.runtime.app.process import StderrHandler

    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("flare-run: warning: %(message)s"))
    logger = logging.getLogger("flare.runtime")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def _show_version(value: bool) -> None:
    if value:
        from flare.runtime.foundation.version import version

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
    if plan.fmt is OutputFormat.rtstruct:
        reqs.append(("rt_utils", "dicom"))
    message = need(reqs)
    if message is not None:
        raise InputError(None, f"this run {message}")


def _warn_model(seg: Segmenter, summary: dict[str, Any]) -> None:
    """ONE warning line on stderr (even with -q) when the bundle's card says its models saw only synthetic data,
    recorded as the summary's ``model_warning``. A server's card arrives with its first answer: the line is printed
    then (once per run, not per case)."""

    def warn(warning: str) -> None:
        typer.echo(f"flare-run: warning: {warning}", err=True)
        summary["model_warning"] = warning

    card = getattr(seg.bundle, "card", None)
    warning = None if card is None else card.warning()
    if warning is not None:
        warn(warning)
    elif hasattr(seg, "on_model_warning"):  # flare-run --server
        seg.on_model_warning = warn


def _run_plan(plan: Plan, seg: Segmenter, quiet: bool, concurrency: int = 1) -> int:
    from flare.runtime.app.batch import SummaryError, run_plan
    from flare.runtime.app.progress import run_display

    extra: dict[str, Any] = {"bundle": str(seg.bundle.root), "device": seg.device, "format": plan.fmt.value,
                             "model_warning": None}
    _warn_model(seg, extra)
    try:
        with run_display(plan, seg, quiet) as display:
            results = run_plan(plan, seg, hooks_for=display.hooks_for, on_done=display.on_done, summary_extra=extra,
                               concurrency=concurrency)
    except SummaryError as err:  # e.g. the disk is full: the run stops, the cases written so far stay
        typer.echo(f"flare-run: error: {err}", err=True)
        return EXIT_SOME_FAILED
    failed = [r for r in results if r.status != "ok"]
    if not plan.folder_mode:
        if failed:
            raise _fail(failed[0].error or "failed")
        return EXIT_OK
    if not quiet:
        typer.echo(f"flare-run: {len(results) - len(failed)} of {len(results)} cases written to {plan.out_dir}; "
                   f"summary: {plan.summary_path}", err=True)
    if failed:
        names = ", ".join(r.name for r in failed[:10]) + (f" and {len(failed) - 10} more (summary.json lists them)"
                                                           if len(failed) > 10 else "")
        typer.echo(f"flare-run: {len(failed)} case(s) failed: {names}", err=True)
        return EXIT_SOME_FAILED
    return EXIT_OK


def _bundle_folder(bundle: Path) -> Path:
    """The bundle's folder, also when ``--bundle`` names its ``bundle.json``: every file there is read by the run."""
    return bundle.parent if bundle.name == "bundle.json" else bundle


def _note_precision(seg: Segmenter | RemoteSegmenter, asked: str | None) -> None:
    """One line on stderr when the CPU default picked the bundle's int8 models (so a user comparing with an fp32
    run knows why the numbers differ slightly), or when the precision asked for is not the one running (a bundle
    without fp16 models runs fp32)."""
    engines = getattr(seg, "engines", None)
    running = engines[0].precision if engines else None
    if asked is None and running == "int8":
        typer.echo("flare-run: note: using the bundle's int8 models on the CPU (verified against fp32 at export; "
                   "--precision fp32 for the fp32 models)", err=True)
    elif asked is not None and running is not None and running != asked:
        typer.echo(f"flare-run: note: --precision {asked}: the bundle has no {asked} models; running {running}",
                   err=True)


@app.command()
def run(
    inputs: Annotated[list[Path] | None, typer.Argument(metavar="INPUT...",
        help="CT images: NIfTI files (.nii.gz, .nii; any orientation, HU), DICOM series folders, single .dcm files, "
             "or folders of cases (NIfTI files and/or DICOM series, searched recursively).", show_default=False)
        ] = None,
    input_opt: Annotated[list[Path] | None, typer.Option("-i", "--input", help="An INPUT (TotalSegmentator's "
                         "spelling; may be repeated, and mixed with INPUT arguments).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output",
                      help="One image: the label map to write (.nii.gz/.nii NIfTI, .rtstruct.dcm RTSTRUCT, other "
                           ".dcm DICOM-SEG; default INPUT_seg.nii.gz beside the input). Several cases: a folder "
                           "(created) that gets CASE.nii.gz (or CASE.dcm, CASE.rtstruct.dcm) per case and "
                           "summary.json.", show_default=False)] = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b",
                      help="Bundle folder. Default: $FLARE_BUNDLE, else ~/.cache/flare/bundle.",
                      show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when ONNX Runtime has it), cpu, cuda or gpu, cuda:N or "
                                             "gpu:N (CUDA device N).")] = "auto",
    folds: Annotated[int | None, typer.Option(min=1, help="Use the first N folds (default: all).",
                                              show_default=False)] = None,
    overlap: Annotated[float | None, typer.Option(min=0.0, max=MAX_OVERLAP,
                       help="Tile overlap ratio; > 0 blends tiles with Gaussian weights (default: bundle's, 0).",
                       show_default=False)] = None,
    precision: Annotated[Precision | None, typer.Option(help="Model precision (default: fp16 on CUDA, int8 on the "
                                                             "CPU, when the bundle has it; else fp32).",
                                                        show_default=False)] = None,
    engine: Annotated[CpuEngine, typer.Option(help="CPU engine: onnxruntime, or openvino (fp32 only; faster on "
                      "small networks such as the cpu profile's; extra 'openvino'; implies --device cpu).")
                      ] = CpuEngine.onnxruntime,
    gpu_mem_budget: Annotated[float, typer.Option(min=500.0, max=10_000_000.0,
                              help="GPU memory budget in MB (the process's whole NVML footprint): picks the tile "
                                   "size; OOM retries smaller, then CPU.")
                              ] = DEFAULT_BUDGET_MB,
    cudnn_algo_search: Annotated[CudnnAlgoSearch, typer.Option(case_sensitive=False,
                                 help="CUDA: cuDNN convolution algorithm search, HEURISTIC (fast start) or "
                                      "EXHAUSTIVE (benchmarks each conv on the first tile).")
                                 ] = CudnnAlgoSearch.HEURISTIC,
    postprocess: Annotated[Mode | None, typer.Option(
                           help="Clean-up rules: paper (tumor dropped when its total is under 100 mm³; liver, kidneys, "
                                "spleen, pancreas, aorta each keep their largest run of z slices) or strict (largest "
                                "3-D components, small tumor components). Default: the bundle's, paper.",
                           show_default=False)] = None,
    fmt: Annotated[OutputFormat | None, typer.Option("--format",
                   help="Output format (several cases; one image: from the -o suffix). dicom-seg and rtstruct "
                        "need DICOM input. Default: nifti.", show_default=False)] = None,
    series: Annotated[str | None, typer.Option("--series", help="Segment only the DICOM series with this "
                                               "SeriesInstanceUID.", show_default=False)] = None,
    statistics: Annotated[Path | None, typer.Option("--statistics", help="Per-label voxels, volume (ml), mean/std "
                          "HU and the tumor count as JSON: a file for one image, a folder for several "
                          "(CASE_stats.json); without a value, beside the output (OUT_stats.json, or in the -o "
                          "folder).", show_default=False)] = None,
    roi_subset: Annotated[list[str] | None, typer.Option("--roi-subset", "--roi_subset", help="Keep only these "
                          "labels (TotalSegmentator names: liver, kidney_right, ...; several names may follow one "
                          "--roi-subset); the others are set to 0 in every output.", show_default=False)] = None,
    masks: Annotated[Path | None, typer.Option("--masks", help="Also write one 0/1 mask per label into this folder "
                     "(created), named as TotalSegmentator does (liver.nii.gz, kidney_right.nii.gz, ...); several "
                     "cases: DIR/CASE/.", show_default=False)] = None,
    label_table: Annotated[bool, typer.Option("--label-table", help="Also write the label names and colours "
                           "beside each label map: OUT.ctbl (3D Slicer colour table) and OUT.itksnap.txt (ITK-SNAP "
                           "label descriptions).")] = False,
    preview: Annotated[Path | None, typer.Option("--preview", help="PNG of axial/coronal/sagittal overlays: a "
                       "file for one image, a folder for several (CASE_preview.png). Needs matplotlib "
                       "(extra 'preview').", show_default=False)] = None,
    report: Annotated[Path | None, typer.Option(help="Run report as JSON (stages, crop, tiles, memory, voxels): "
                      "a file for one image, a folder for several (CASE_report.json).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    server: Annotated[str | None, typer.Option(help="Segment on flare-serve servers at HOST:PORT (their HTTP port; "
                      "several: comma-separated) instead of here; --bundle, --device, --precision, --engine "
                      "and --gpu-mem-budget are the servers'.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="With --server: cases in flight at once, spread "
                           "over the servers (each goes to the one with the fewest in flight).")] = 1,
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Segment each INPUT and write its label map in the input's own space (shape, affine, header)."""
    _setup_logging(quiet)
    with exit_on_signals("flare-run"):
        try:
            from flare.runtime.app.plan import make_plan
            from flare.runtime.inference.device import parse_device

            parse_device(device)
            if concurrency > 1 and server is None:
                raise InputError(None, "--concurrency needs --server (locally one case runs at a time, using "
                                       "every core)")
            from flare.runtime.bundle.manifest import default_bundle_dir

            plan = make_plan([*(input_opt or []), *(inputs or [])], output=output, fmt=fmt, series=series,
                             statistics=statistics, preview=preview, report=report, masks=masks,
                             label_table=label_table, roi_subset=roi_subset,
                             protect=() if server is not None else [_bundle_folder(bundle or default_bundle_dir())])
            _check_extras(plan)
            from flare.runtime.pipeline.limits import preflight
            from flare.runtime.pipeline.segmenter import Segmenter

            seg: Segmenter | RemoteSegmenter
            if server is not None:  # flare-serve: the cases are read and written here, segmented there
                from flare.runtime.serving.client import RemoteSegmenter

                seg = RemoteSegmenter(server, folds=folds, overlap=overlap, progress=not quiet,
                                      postprocess=None if postprocess is None else postprocess.value)
            else:
                if not plan.folder_mode:  # refuse from the header(s) before loading the models
                    case = plan.jobs[0].case
                    preflight(case.source, bundle or default_bundle_dir(), kind=case.kind, series_uid=case.series_uid)
                seg = Segmenter(bundle or default_bundle_dir(), device=device, folds=folds, overlap=overlap,
                                precision=None if precision is None else precision.value, gpu_mem_budget=gpu_mem_budget,
                                postprocess=None if postprocess is None else postprocess.value,
                                cudnn_algo_search=cudnn_algo_search.value, engine=engine.value)
            plan.create_folders()
            if not quiet:
                _note_precision(seg, None if precision is None else precision.value)
        except FlareError as err:
            raise _fail(str(err)) from None
        except MemoryError:
            raise _fail("out of memory while loading the bundle") from None
    with exit_on_signals("flare-run"):
        try:
            code = _run_plan(plan, seg, quiet or server is not None, concurrency)  # type: ignore[arg-type]  # remote
        except BaseException:  # interrupted: the folders this run made and left empty go too
            plan.remove_empty_folders()
            raise
    raise typer.Exit(code)


def ts_argv(argv: list[str]) -> list[str]:
    """TotalSegmentator's argument habits made typer-readable: ``--roi-subset``/``--roi_subset`` followed by several
    names (each following word that is a label name is taken) becomes one option per name, ``--statistics``
    without a value (followed by nothing, by an option, or by a NIfTI/DICOM input) gets :data:`BESIDE_OUTPUT`, and
    ``-ot``/``--output_type nifti|dicom_seg|dicom_rtstruct`` becomes ``--format``."""
    from flare.runtime.foundation.labels import label_named

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if arg in ("--roi-subset", "--roi_subset"):
            names: list[str] = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                try:
                    label_named(argv[i + 1])
                except KeyError:
                    if names:
                        break  # an INPUT after the names
                names.append(argv[i + 1])  # the first word is always the option's value (unknown: its error)
                i += 1
            out += [x for name in names for x in ("--roi-subset", name)] or [arg]
        elif arg in ("-ot", "--output_type", "--output-type") and i + 1 < len(argv):
            value = argv[i + 1].replace("_", "-")
            out += ["--format", "rtstruct" if value == "dicom-rtstruct" else value]
            i += 1
        elif arg == "--statistics":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out.append(arg)
            if nxt is None or nxt.startswith("-") or nxt.lower().endswith((*NIFTI_SUFFIXES, ".dcm")):
                out.append(str(BESIDE_OUTPUT))
        else:
            out.append(arg)
        i += 1
    return out


def main() -> None:
    import sys

    from flare.runtime.app.process import guard_stderr, install_signal_handlers

    guard_stderr()
    install_signal_handlers()
    app(args=ts_argv(sys.argv[1:]))


if __name__ == "__main__":  # python -m: through the console script's funnel (extras, signal exits)
    from flare.runtime.app.entrypoints import launch

    launch("flare-run")
