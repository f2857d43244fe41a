"""``flare-run``: segment one CT with a bundle, torch-free.

Exit codes: 0 success, 2 bad input / bundle / output (one line on stderr, no traceback, no output file),
130 interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import FlareError, InputError, OutputError
from .postprocessing import Mode

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Segment an abdominal CT (13 FLARE23 organs + tumor) with an exported flare bundle.")

_NII_SUFFIXES = (".nii.gz", ".nii")


def default_output(input_path: Path) -> Path:
    """``ct.nii.gz`` → ``ct_seg.nii.gz`` beside the input."""
    name = input_path.name
    for suffix in _NII_SUFFIXES:
        if name.endswith(suffix):
            return input_path.with_name(name[: -len(suffix)] + "_seg.nii.gz")
    return input_path.with_name(name + "_seg.nii.gz")


def check_output(output: Path, input_path: Path) -> None:
    """Fail before any work when the output cannot be written."""
    from .atomic import ensure_writable_folder

    if not output.name.endswith(_NII_SUFFIXES):
        raise OutputError(output, "output must end in .nii.gz or .nii")
    if output.resolve() == input_path.resolve():
        raise OutputError(output, "output would overwrite the input")
    if output.is_dir():
        raise OutputError(output, "output is a folder; give a file name ending in .nii.gz")
    ensure_writable_folder(output)


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flare-run: warning: %(message)s"))
    logger = logging.getLogger("flare.runtime")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False


@app.command()
def run(
    input: Annotated[Path, typer.Argument(help="CT image, .nii.gz or .nii (any orientation, HU).")],
    output: Annotated[Path | None, typer.Option("-o", "--output",
                      help="Label map to write (uint8 FLARE ids). Default: INPUT_seg.nii.gz beside the input.")] = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b",
                      help="Bundle folder. Default: $FLARE_BUNDLE, else ~/.cache/flare/bundle.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    folds: Annotated[int | None, typer.Option(min=1, help="Use the first N folds (default: all).")] = None,
    overlap: Annotated[float | None, typer.Option(min=0.0, max=0.95,
                       help="Tile overlap ratio; > 0 blends tiles with Gaussian weights (default: bundle's, 0).")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 or fp16 (default: fp16 on CUDA when present).")] = None,
    gpu_mem_budget: Annotated[float, typer.Option(min=500.0,
                              help="GPU memory budget in MB: picks the tile size; OOM retries smaller, then CPU.")
                              ] = 4000.0,
    postprocess: Annotated[Mode | None, typer.Option(
                           help="Clean-up rules: paper (tumor dropped when its total is under 100 mm³; liver, kidneys, "
                                "spleen, pancreas, aorta each keep their largest run of z slices) or strict (largest "
                                "3-D components, small tumor components). Default: the bundle's, paper.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report (stages, crop, tiles, memory).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    server: Annotated[str | None, typer.Option(help="Segment on a flare-serve server at HOST:PORT (its HTTP port) "
                      "instead of here; --bundle, --device, --precision and --gpu-mem-budget are the server's.")
                      ] = None,
) -> None:
    """Segment INPUT and write the label map in INPUT's own space (shape, affine, header)."""
    from .bundle import default_bundle_dir

    _setup_logging(quiet)
    try:
        if not input.exists():
            raise InputError(input, "no such file")
        out = output if output is not None else default_output(input)
        check_output(out, input)
        if report is not None:
            from .atomic import ensure_writable_folder

            ensure_writable_folder(report)
        if server is not None:
            from .remote import run_remote

            rep = run_remote(server, input, out, folds=folds, overlap=overlap, quiet=quiet,
                             postprocess=None if postprocess is None else postprocess.value)
        else:
            from .progress import run_with_progress

            rep = run_with_progress(input, out, bundle or default_bundle_dir(), device=device, folds=folds,
                                    overlap=overlap, precision=precision, quiet=quiet, gpu_mem_budget=gpu_mem_budget,
                                    postprocess=None if postprocess is None else postprocess.value)
        if report is not None:
            from .atomic import write_text_atomic

            write_text_atomic(report, json.dumps(rep, indent=2) + "\n")
    except FlareError as err:
        typer.echo(f"flare-run: error: {err}", err=True)
        raise typer.Exit(2) from None
    except MemoryError:
        typer.echo(f"flare-run: error: {input}: out of memory", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("flare-run: interrupted", err=True)
        raise typer.Exit(130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
