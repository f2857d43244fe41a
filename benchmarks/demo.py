"""``flare-demo``: the whole loop in one command, on this machine's CPU.

phantoms → ``flare-train run --config tiny`` → ``flare-export --fp16`` → ``flare-run`` on a held-out phantom and on
the real CT in ``../shared/data`` (when present) → a short ``flare-bench`` report → the bundle installed as the
default bundle, so that a plain ``flare-run ct.nii.gz -o seg.nii.gz`` works afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from flare.runtime.foundation.errors import FlareError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _say(msg: str) -> None:
    typer.echo(f"flare-demo: {msg}", err=True)


def install_default_bundle(bundle: Path, target: Path) -> Path:
    """Copy ``bundle`` to ``target`` (the default bundle folder) through a temporary folder and a rename; an
    existing flare bundle there is replaced, anything else is refused."""
    from flare.runtime.bundle.manifest import load_bundle

    if target.exists() and not (target / "bundle.json").is_file():
        raise FlareError(target, "exists and is not a flare bundle; not replacing it (set FLARE_BUNDLE elsewhere)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.installing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp)
    load_bundle(tmp)  # verify the copy before it replaces anything
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _dice_table(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from flare.benchmarks.metrics import dice_per_class
    from flare.runtime.foundation.labels import name_of

    truth_ids = set(np.unique(truth).tolist()) - {0}
    return {name_of(k): round(v, 3) for k, v in dice_per_class(pred, truth).items() if k in truth_ids}


def segment_and_score(seg: Any, image: Path, truth: Path | None, out: Path) -> dict[str, Any]:
    """Run the runtime on ``image`` into ``out`` and score it against ``truth`` when given."""
    import nibabel as nib
    from flare.runtime.app.write import Outputs, write_result

    seg_result = seg.segment(image)
    write_result(seg_result, Outputs(out))
    result: dict[str, Any] = {"image": str(image), "output": str(out), "total_s": seg_result.report.total_s,
                              "stages": seg_result.report.stages}
    if truth is not None and truth.is_file():
        dice = _dice_table(seg_result.labels, np.asarray(nib.load(truth).dataobj).astype(np.uint8))
        result["dice"] = dice
        organs = [v for k, v in dice.items() if k != "tumor"]
        result["organ_mean_dice"] = round(float(np.mean(organs)), 3) if organs else None
    return result


def _heldout_case(phantoms: Path) -> tuple[Path, Path | None]:
    doc = json.loads((phantoms / "dataset.json").read_text())
    entries = doc.get("testing") or doc["training"]
    entry = entries[0]
    truth = entry.get("label_full") or entry.get("label")
    return phantoms / entry["image"], (phantoms / truth if truth else None)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder for everything the demo makes.")] = Path(
        "demo-out"),
    cases: Annotated[int, typer.Option(min=10, help="Number of phantoms (some are held out).")] = 40,
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 0,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Write a short flare-bench report.")] = True,
    install: Annotated[bool, typer.Option("--install/--no-install",
                                          help="Install the bundle as the default bundle.")] = True,
) -> None:
    """Phantoms → tiny training (5 folds, pseudo-labels) → fp16 export → flare-run → benchmark → default bundle."""
    try:
        summary = run_demo(out, cases=cases, seed=seed, bench=bench, install=install)
    except FlareError as err:
        _say(f"error: {err}")
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary["results"], indent=1))


def run_demo(out: Path, *, cases: int = 40, seed: int = 0, bench: bool = True, install: bool = True) -> dict[str, Any]:
    from flare.benchmarks.cases import shared_data_dir
    from flare.export import export_bundle
    from flare.runtime import Segmenter
    from flare.runtime.bundle.manifest import default_bundle_dir
    from flare.runtime.foundation.atomic import write_text_atomic
    from flare.train.phantoms import make_phantoms
    from flare.train.run import run_all

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    results: dict[str, Any] = {}

    def step(name: str, t: float) -> None:
        times[name] = round(time.perf_counter() - t, 1)
        _say(f"{name} done in {times[name]} s")

    t = time.perf_counter()
    _say(f"1/6 writing {cases} phantoms to {out / 'phantoms'}")
    make_phantoms(out / "phantoms", cases, seed, size=96)
    step("phantoms", t)
    t = time.perf_counter()
    _say("2/6 training: locator + stage 1 + pseudo-labels + stage 2, 5 folds (config tiny)")
    train = run_all(out / "phantoms", out / "checkpoints", config="tiny", folds=5)
    results["training_holdout"] = train.get("holdout")
    step("train", t)
    t = time.perf_counter()
    _say("3/6 exporting fp32 + fp16 ONNX with verification")
    bundle = export_bundle(out / "checkpoints", out / "bundle", fp16=True, verify=True, progress=False,
                           command="flare-demo")
    step("export", t)
    t = time.perf_counter()
    _say("4/6 flare-run on a held-out phantom and the real CT")
    seg = Segmenter(bundle, device="auto")
    image, truth = _heldout_case(out / "phantoms")
    results["heldout_phantom"] = segment_and_score(seg, image, truth, out / "heldout_seg.nii.gz")
    real = shared_data_dir() / "ts_abdomen_ct_3mm.nii.gz"
    if real.is_file():
        results["real_ct"] = segment_and_score(seg, real, shared_data_dir() / "ts_abdomen_labels_flare_ids.nii.gz",
                                               out / "real_ct_seg.nii.gz")
    step("run", t)
    if bench:
        t = time.perf_counter()
        _say("5/6 flare-bench (short: held-out phantom + real CT, MONAI reference alongside)")
        from flare.benchmarks.harness import run_benchmark

        cases_list: list[str | Path] = [image] + ([real] if real.is_file() else [])
        rep = run_benchmark(bundle, cases_list, reference=True, out_dir=out / "bench", repeats=2, device="auto",
                            quiet=True, command="flare-demo")
        results["bench_report"] = str(out / "bench" / "report.md")
        results["bench"] = rep.get("summary", {})
        step("bench", t)
    if install:
        target = install_default_bundle(bundle, default_bundle_dir())
        results["default_bundle"] = str(target)
        _say(f"6/6 installed the bundle as the default bundle: {target}")
    times["total"] = round(time.perf_counter() - t0, 1)
    summary = {"out": str(out), "bundle": str(bundle), "seconds": times, "results": results}
    write_text_atomic(out / "demo.json", json.dumps(summary, indent=1) + "\n")
    _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    r = summary["results"]
    lines = [f"everything is in {summary['out']} (demo.json, bundle/, checkpoints/, bench/)",
             f"step times (s): {summary['seconds']}"]
    h = r.get("heldout_phantom", {})
    if h:
        lines.append(f"held-out phantom: organ mean Dice {h.get('organ_mean_dice')} · {h.get('dice')}")
        lines.append(f"held-out phantom stages (s): {h.get('stages')}")
    if "real_ct" in r:
        lines.append(f"real CT (trained on phantoms only, so expect little): organ mean Dice "
                     f"{r['real_ct'].get('organ_mean_dice')}")
    if "bench_report" in r:
        lines.append(f"benchmark report: {r['bench_report']}")
    if "default_bundle" in r:
        lines.append(f"default bundle: {r['default_bundle']} — now try: flare-run CT.nii.gz -o seg.nii.gz")
    for line in lines:
        _say(line)


def main() -> None:
    from flare.train.engine import torch_setup

    torch_setup(2)  # before anything imports torch: picks the OpenMP wait policy from the CPU load (see its doc)
    app()


if __name__ == "__main__":
    main()
