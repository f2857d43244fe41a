"""``flare-bench``: time and memory of the flare runtime, side by side with the MONAI/PyTorch reference.

Exit codes: 0 success, 2 bad bundle / cases / output (one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from flare.runtime.app.cli import Device, Precision
from flare.runtime.foundation.errors import FlareError
from flare.runtime.inference.engine_names import CpuEngine

from .reference import MODES

#: --reference-mode choices, shown in --help (the modes are defined once, in benchmarks/reference.py)
ReferenceMode = Enum("ReferenceMode", {m: m for m in MODES}, type=str)  # type: ignore[misc]
DEFAULT_REFERENCE_MODE = ReferenceMode("whole-image-nearest")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Benchmark a flare bundle: cold/warm time per case, per-stage times, GPU memory (NVML) peak "
                       "and MB·s, host RSS, against FLARE's 15 s / 4 GB and the MONAI reference.")


@app.command()
def bench(
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b",
                      help="Bundle folder. Default: $FLARE_BUNDLE, else ~/.cache/flare/bundle.")] = None,
    cases: Annotated[str, typer.Option(help="'synthetic' (FLARE-size CTs built from ../shared/data, cached), a "
                                            "folder of .nii.gz, or one .nii.gz file.")] = "synthetic",
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for report.md, report.json, PNGs.")]
    = Path("bench-out"),
    reference: Annotated[bool, typer.Option("--reference/--no-reference",
                         help="Also run the MONAI/PyTorch reference (Auto3DSeg-like) on the same weights.")] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Warm runs per case (models loaded once).")] = 3,
    cold: Annotated[int, typer.Option(min=0, help="Cold runs per case (fresh flare-run process).")] = 1,
    reference_repeats: Annotated[int, typer.Option(min=1, help="Reference runs per case.")] = 1,
    reference_cases: Annotated[int | None, typer.Option(min=1, help="Run the reference on the first N cases "
                               "(default: all on GPU, 1 on CPU).")] = None,
    reference_folds: Annotated[int | None, typer.Option(min=1, help="Reference (and a matching runtime run) "
                               "with the first N folds (default: all on GPU, 1 on CPU).")] = None,
    reference_mode: Annotated[ReferenceMode, typer.Option(help="whole-image-nearest (the peer: whole image, labels restored nearest; auto3dseg is its old name) or mirror (the runtime's steps).")]
    = DEFAULT_REFERENCE_MODE,
    checkpoints: Annotated[Path | None, typer.Option(help="Checkpoint folder for the reference "
                           "(default: the bundle's provenance.checkpoint_dir).")] = None,
    device: Annotated[Device, typer.Option(help="Runtime and reference alike.")] = Device.auto,
    precision: Annotated[list[Precision] | None, typer.Option("--precision", help="Runtime precision; repeat it "
                         "(--precision fp32 --precision int8) to run them side by side, interleaved, with the labels "
                         "of each compared with the first's. Default: flare-run's choice.", show_default=False)
                         ] = None,
    folds: Annotated[int | None, typer.Option(min=1, help="Runtime with the first N folds (default: all).",
                                              show_default=False)] = None,
    engine: Annotated[list[CpuEngine] | None, typer.Option("--engine", help="CPU engine; repeat it (--engine "
                      "onnxruntime --engine openvino) to run them side by side like --precision (OpenVINO runs "
                      "fp32 only). Default: onnxruntime.", show_default=False)] = None,
    cache: Annotated[Path | None, typer.Option(help="Where synthetic cases are cached "
                     "(default ~/.cache/flare/bench-cases).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    runs_log: Annotated[Path | None, typer.Option(help="Append one JSON line per run to this file as each run "
                        "ends (kept when the benchmark is cut short).")] = None,
    server: Annotated[str | None, typer.Option(help="Load-test a running flare-serve at HOST:PORT instead: "
                      "--requests at --concurrency, cycling through --cases; writes OUTPUT/serve_load.md/.json.")
                      ] = None,
    requests: Annotated[int, typer.Option(min=1, help="With --server: number of requests.")] = 20,
    concurrency: Annotated[int, typer.Option(min=1, help="With --server: requests in flight at once.")] = 4,
    proxy: Annotated[str | None, typer.Option(help="Instead: the CPU proxy of the device pipeline's host work "
                     "(worst or realistic synthetic 512x512x300 CT, instant engine, stand-in device arrays; "
                     "--repeats runs); writes OUTPUT/proxy-<case>.json. See benchmarks/proxy.py.")] = None,
) -> None:
    """Run the benchmark and write OUTPUT/report.md, OUTPUT/report.json and OUTPUT/memory_*.png."""
    from flare.runtime.app.process import exit_on_signals
    from flare.runtime.bundle.manifest import default_bundle_dir
    from flare.runtime.foundation.errors import OutputError

    from .cases import resolve_cases
    from .harness import run_benchmark
    with exit_on_signals("flare-bench"):  # Ctrl-C: one line, exit 130
        try:
            if output.exists() and not output.is_dir():
                raise OutputError(output, "output must be a folder")
            if not output.parent.is_dir():
                raise OutputError(output, f"parent folder {output.parent} does not exist")
            if proxy is not None:
                from .proxy import main as run_proxy

                run_proxy(proxy, repeats, output / f"proxy-{proxy}.json")
                return
            if server is not None:
                from .serve_load import run_load, write_load_report

                load = run_load(server, resolve_cases(cases, cache), requests, concurrency,
                                command=shlex.join(["flare-bench"] + sys.argv[1:]))
                md = write_load_report(load, output)
                if not quiet:
                    typer.echo(md.read_text(), err=True)
                return
            report = run_benchmark(bundle or default_bundle_dir(), cases, reference=reference, out_dir=output,
                                   repeats=repeats, device=device.value, cold=cold, reference_repeats=reference_repeats,
                                   reference_mode=reference_mode.value, reference_cases=reference_cases,
                                   reference_folds=reference_folds, checkpoints=checkpoints, cache_dir=cache,
                                   quiet=quiet, command=shlex.join(["flare-bench"] + sys.argv[1:]), runs_log=runs_log,
                                   precisions=[p.value for p in precision or []], folds=folds,
                                   engines=[e.value for e in engine or []])
        except FlareError as err:
            typer.echo(f"flare-bench: error: {err}", err=True)
            raise typer.Exit(2) from None
    if not quiet:
        typer.echo(f"wrote {output / 'report.md'} ({len(report['cases'])} case(s))", err=True)
    from .report import run_errors

    errors = run_errors(report)
    if errors:  # as flare-run with several cases: the report is written, but the benchmark did not measure them all
        name, first = errors[0]
        typer.echo(f"flare-bench: {len(errors)} run(s) failed, first {name}: {first} (report.md lists them)", err=True)
        raise typer.Exit(3)


def main() -> None:
    app()


if __name__ == "__main__":  # python -m: through the console script's funnel (extras, signal exits)
    from flare.runtime.app.entrypoints import launch

    launch("flare-bench")
