"""``flare-export``: checkpoints (flare-train or MONAI Auto3DSeg) -> verified bundle."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from flare.runtime.app.process import exit_on_signals
from flare.runtime.foundation.errors import FlareError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Export flare-train (or Auto3DSeg segresnet) checkpoints to a verified ONNX bundle.")


@app.command()
def export(
    checkpoint_dir: Annotated[Optional[Path], typer.Argument(  # noqa: UP045 (typer needs Optional)
        help="flare-train checkpoint folder (locator/, fold0/ ... with model.pt + config.json)",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="bundle folder to write (replaced if it is a bundle)")] = ...,  # type: ignore[assignment]
    from_auto3dseg: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--from-auto3dseg", help="MONAI Auto3DSeg work dir with segresnet_<fold>/ folders (instead of "
                                 "CHECKPOINT_DIR)", show_default=False)] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write an fp16 model per network "
                                                      "(normalisation in fp32, float32 I/O)")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="also write a static int8 model per network for the CPU "
                                                      "(calibrated on --calibration, verified against fp32)")] = False,
    calibration: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
        "--calibration", help="with --int8: real CTs (.nii/.nii.gz files or folders of them; repeat the option; with "
                              "two or more, every fourth is held out for verification)", show_default=False)] = None,
    profile: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--profile", help="bundle profile: gpu or cpu (default: the training config's)", show_default=False)] = None,
    trt: Annotated[bool, typer.Option("--trt", help="also build TensorRT engines (needs tensorrt and a GPU)")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (the TorchScript exporter's 13-20)", min=13,
                                       max=20)] = 17,
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="check ONNX Runtime CPU against PyTorch per model (and int8 "
                                              "against fp32: the int8 gate)")] = True,
    card: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--card", help="model card JSON (dataset, cases, data: synthetic|real, recipe, trained_at, validation_dice, "
                       "intended_use, licence, ...): its fields replace those derived from the checkpoints "
                       "(CHECKPOINT_DIR/card.json from flare-train, else recipe and date)", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no progress display")] = False,
) -> None:
    """Write BUNDLE_DIR/bundle.json and the model files; exit code 2 with one line on stderr on any problem."""
    if (checkpoint_dir is None) == (from_auto3dseg is None):
        _fail("give either CHECKPOINT_DIR or --from-auto3dseg WORK_DIR (exactly one)")
    if calibration and not int8:
        _fail("--calibration is for --int8")
    if int8 and from_auto3dseg is not None:
        _fail("--int8 is available for flare-train checkpoints (CHECKPOINT_DIR)")
    if profile is not None and profile not in ("gpu", "cpu"):
        _fail(f"--profile {profile!r}: use gpu or cpu")
    command = "flare-export " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with exit_on_signals("flare-export"):  # the staging folder is removed before the exit
        bundle = _export(checkpoint_dir, out, from_auto3dseg, fp16=fp16, trt=trt, opset=opset, verify=verify,
                         quiet=quiet, command=command, int8=int8, calibration=calibration or [], profile=profile,
                         card=card)
    if not quiet:
        typer.echo(f"bundle written: {bundle}")


def _export(checkpoint_dir: Path | None, out: Path, from_auto3dseg: Path | None, *, fp16: bool, trt: bool, opset: int,
            verify: bool, quiet: bool, command: str, int8: bool, calibration: list[Path], profile: str | None,
            card: Path | None) -> Path:
    try:
        if from_auto3dseg is not None:
            from .auto3dseg import export_auto3dseg

            bundle = export_auto3dseg(from_auto3dseg, out, fp16=fp16, trt=trt, opset=opset, verify=verify,
                                      progress=not quiet, command=command, card=card)
        else:
            from .bundle_export import export_bundle

            bundle = export_bundle(checkpoint_dir, out, fp16=fp16, trt=trt, opset=opset,  # type: ignore[arg-type]
                                   verify=verify, progress=not quiet, command=command, int8=int8,
                                   calibration=calibration, profile=profile, card=card)
    except FlareError as exc:
        _fail(str(exc))
    return bundle


def _fail(message: str) -> NoReturn:
    typer.echo(f"flare-export: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    from flare.runtime.app.process import install_signal_handlers

    install_signal_handlers()  # SIGTERM/SIGHUP unwind like Ctrl-C: the staging folder is removed
    app()


if __name__ == "__main__":  # python -m: through the console script's funnel (extras, signal exits)
    from flare.runtime.app.entrypoints import launch

    launch("flare-export")
