"""``flare-demo``: the whole loop in one command, on this machine's CPU.

phantoms (training set + a held-out set from a seed training never uses) → ``flare-train run --config demo`` (4 mm,
one fold) → ``flare-export --fp16`` → ``flare-run`` on every held-out phantom (Dice per class in the input grid) and
on the real CT in ``../shared/data`` (when present) → ``flare-bench`` of the runtime against the MONAI
reference with the same settings on one held-out phantom → the bundle installed as the
default bundle, so that a plain ``flare-run ct.nii.gz -o seg.nii.gz`` works afterwards. ``--proof`` runs the proof
instead (:mod:`flare.benchmarks.proof`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from flare.benchmarks.proof import PROOF_TEST_CASES, PROOF_TRAIN_CASES
from flare.runtime.foundation.errors import FlareError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _say(msg: str) -> None:
    typer.echo(f"flare-demo: {msg}", err=True)


def check_install_target(target: Path) -> None:
    """The default bundle folder may be replaced only when it is absent or a flare bundle."""
    if target.exists() and not (target / "bundle.json").is_file():
        raise FlareError(target, "exists and is not a flare bundle; not replacing it (set FLARE_BUNDLE elsewhere)")


def preflight(out: Path, config: str, install: bool) -> None:
    """What would stop the demo or the proof later, refused before any work: OUT a file, OUT/bundle not a bundle,
    a bad --config, a default bundle folder that may not be replaced."""
    from flare.export.bundle_export import check_target
    from flare.runtime.bundle.manifest import default_bundle_dir
    from flare.runtime.foundation.errors import OutputError
    from flare.train.config import load_config

    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    if (out / "bundle").exists():
        check_target((out / "bundle").resolve())
    load_config(config)
    if install:
        check_install_target(default_bundle_dir())


def install_default_bundle(bundle: Path, target: Path) -> Path:
    """Copy ``bundle`` to ``target`` (the default bundle folder) through a temporary folder and a rename; an
    existing flare bundle there is replaced, anything else is refused."""
    from flare.runtime.bundle.manifest import load_bundle

    check_install_target(target)
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


#: training phantoms of the demo (seed 0; 32 of them labelled)
DEMO_TRAIN_CASES = 40
#: held-out phantoms of the demo (seed :data:`flare.benchmarks.proof.HELDOUT_SEED`)
DEMO_TEST_CASES = 12
#: The demo's time on the idle 2-core box it was sized on (2026-12-06, Intel Xeon with AVX-512 under KVM, `demo`
#: config of stage 1 1000 + stage 2 1300 steps; train/results/RESULTS.md): seconds of the parts that scale with
#: the number of training steps (locator, stage 1, stage 2) and of those that do not (phantoms, pseudo-labels,
#: export, flare-run on the held-out set, benchmark), and one probe step (two 32^3 crops, forward + backward,
#: 2 torch threads) there. :func:`budget_fraction` scales the steps to a time budget from them.
IDLE_STEPS_S = 335.0
IDLE_FIXED_S = 70.0
IDLE_PROBE_S = 0.102
#: after stage 2 on the idle box: export, flare-run on the held-out set and the real CT, benchmark (seconds), and
#: one stage-1 training step there (134 s / 1000 steps)
IDLE_AFTER_S = 15.0
IDLE_STAGE1_STEP_S = 0.134


def probe_step_seconds(cfg: dict[str, Any], repeats: int = 4) -> float:
    """Seconds of one training step of ``cfg``'s network on random crops (``num_crops`` of ``roi``), median of
    ``repeats`` after a warm-up: how fast this machine trains right now, load included."""
    import torch
    from flare.train.networks import build_network

    net = build_network(cfg["network"]).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    x = torch.rand(int(cfg["train"].get("num_crops", 1)), 1, *[int(v) for v in cfg["roi"]])
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        opt.zero_grad()
        out = net(x)
        sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def _settle(fraction: float) -> float:
    """A planned fraction of the steps: 1 when it is within 10 % of fitting (the probe's own scatter), never below
    0.2 (below that the model learns nothing worth showing)."""
    return 1.0 if fraction >= 0.9 else max(0.2, fraction)


def _scaled_steps(n: int, fraction: float, floor: int) -> int:
    """``n`` steps per epoch scaled by ``fraction``, at least ``floor`` (never more than ``n``)."""
    return max(min(n, floor), round(n * fraction))


def budget_fraction(minutes: float, probe_s: float) -> tuple[float, float]:
    """``(fraction of the demo's training steps that fit in `minutes`, slowdown against the idle reference box)``.
    The fraction is 1 when everything fits or nearly (within 10 %: the probe's own scatter), at least 0.2 (below
    that the model learns nothing worth showing)."""
    slow = max(1.0, probe_s / IDLE_PROBE_S)
    return _settle((minutes * 60.0 - IDLE_FIXED_S * slow) / (IDLE_STEPS_S * slow)), slow


def scale_steps(cfg: dict[str, Any], fraction: float) -> dict[str, Any]:
    """``cfg`` with the steps per epoch of the folds and the locator scaled by ``fraction`` (epochs, warm-up and
    the learning-rate schedule keep their shape)."""
    from flare.train.config import deep_merge

    tr, loc = cfg["train"], cfg["locator"].get("train", {})
    over: dict[str, Any] = {"train": {"steps_per_epoch": _scaled_steps(int(tr["steps_per_epoch"]), fraction, 10)}}
    if loc.get("steps_per_epoch"):
        over["locator"] = {"train": {"steps_per_epoch": _scaled_steps(int(loc["steps_per_epoch"]), fraction, 5)}}
    return deep_merge(cfg, over)


def stage2_fraction(left_s: float, stage1_step_s: float, stage2_steps: int) -> float:
    """Fraction of stage 2's full ``stage2_steps`` that fit in ``left_s`` seconds at the rate stage 1 just ran
    (``stage1_step_s`` a step), leaving time for export and scoring at that rate; 1 within 10 %, at least 0.2."""
    slow = max(1.0, stage1_step_s / IDLE_STAGE1_STEP_S)
    return _settle((left_s - IDLE_AFTER_S * slow) / (stage2_steps * stage1_step_s))


def segment_and_score(seg: Any, image: Path, truth: Path | None, out: Path) -> dict[str, Any]:
    """Run the runtime on ``image`` into ``out`` and score it against ``truth`` when given (classes of the truth)."""
    from flare.benchmarks.proof import case_dice, read_labels
    from flare.runtime.app.write import Outputs, write_result
    from flare.runtime.foundation.labels import ORGAN_IDS, name_of

    seg_result = seg.segment(image)
    write_result(seg_result, Outputs(out))
    result: dict[str, Any] = {"image": str(image), "output": str(out), "total_s": seg_result.report.total_s,
                              "stages": seg_result.report.stages}
    if truth is not None and truth.is_file():
        dice = case_dice(np.asarray(seg_result.labels), read_labels(truth))
        result["dice"] = {name_of(k): round(v, 3) for k, v in dice.items()}
        organs = [v for k, v in dice.items() if k in ORGAN_IDS]
        result["organ_mean_dice"] = round(float(np.mean(organs)), 3) if organs else None
    return result


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder for everything the demo makes.")] = Path(
        "demo-out"),
    cases: Annotated[int | None, typer.Option(min=10, help="Number of training phantoms (default "
                                                          f"{DEMO_TRAIN_CASES}; with --proof {PROOF_TRAIN_CASES}).")] = None,
    test_cases: Annotated[int | None, typer.Option(min=1, help="Held-out phantoms (an unseen seed), all scored "
                                                              f"(default {DEMO_TEST_CASES}; with --proof "
                                                              f"{PROOF_TEST_CASES}).")] = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Write a short flare-bench report.")] = True,
    install: Annotated[bool, typer.Option("--install/--no-install",
                                          help="Install the bundle as the default bundle.")] = True,
    proof: Annotated[bool, typer.Option("--proof", help="Instead of the demo: the proof run (config proof, 4 mm, "
                                        "two-stage and naive, learning curve; see docs/training.md) -> OUT/proof.md, "
                                        "OUT/proof.json, OUT/curve.png")] = False,
    folds: Annotated[int, typer.Option(min=1, help="Folds (1: one model trained on every case).")] = 1,
    config: Annotated[str | None, typer.Option(help="Training config, named or a JSON file (default: demo, or proof "
                                                    "with --proof).")] = None,
    minutes: Annotated[float, typer.Option(min=0, help="Time budget of the demo (not of the install): on a slower or busy CPU "
                                                       "the demo config trains fewer steps to finish in about this "
                                                       "time, and says so; 0 trains every step. Not for --config or "
                                                       "--proof.")] = 8.5,
) -> None:
    """Phantoms → training (config demo: 4 mm, one fold, two-stage) → fp16 export → flare-run on every held-out
    phantom and the real CT → benchmark → default bundle. Output: a short table; everything in OUT/demo.json."""
    try:
        preflight(out, config or ("proof" if proof else "demo"), install and not proof)
        if proof:
            from flare.benchmarks.proof import run_proof

            cases, test_cases = cases or PROOF_TRAIN_CASES, test_cases or PROOF_TEST_CASES
            res = run_proof(out, config=config or "proof", folds=folds, train_cases=cases, test_cases=test_cases,
                            say=_say, command=f"flare-demo --proof --out {out} --cases {cases} --test-cases "
                                              f"{test_cases} --folds {folds} --config {config or 'proof'}")
            typer.echo((out / "proof.md").read_text(), nl=False)
            _say(f"details: {out / 'proof.json'}, curve: {out / 'curve.png'}; {res['seconds']['total']:.0f} s")
            return
        run_demo(out, cases=cases or DEMO_TRAIN_CASES, test_cases=test_cases or DEMO_TEST_CASES, folds=folds,
                 bench=bench, install=install, config=config or "demo",
                 minutes=None if config or not minutes else minutes)
    except FlareError as err:
        _say(f"error: {err}")
        raise typer.Exit(2) from None


def run_demo(out: Path, *, cases: int = DEMO_TRAIN_CASES, test_cases: int = DEMO_TEST_CASES, folds: int = 1,
             bench: bool = True, install: bool = True, config: str | dict[str, Any] = "demo", size: int = 96,
             minutes: float | None = None) -> dict[str, Any]:
    from flare.benchmarks.cases import shared_data_dir
    from flare.benchmarks.proof import HELDOUT_SEED, heldout_entries, make_sets, score_bundle
    from flare.export import export_bundle
    from flare.runtime import Segmenter
    from flare.runtime.bundle.manifest import default_bundle_dir
    from flare.runtime.foundation.atomic import write_text_atomic
    from flare.train.config import load_config
    from flare.train.datalist import load_datalist
    from flare.train.run import run_all

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    results: dict[str, Any] = {"load_before": [round(v, 2) for v in os.getloadavg()],
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)")}

    def step(name: str, t: float) -> None:
        times[name] = round(time.perf_counter() - t, 1)
        _say(f"   {name}: {times[name]} s")

    t = time.perf_counter()
    train_dir, test_dir = make_sets(out, cases, test_cases, size, test_seed=HELDOUT_SEED)
    labelled = len(load_datalist(train_dir)["training"])  # the loader's rule: a case without a label is left out
    _say(f"1/6 phantoms: {labelled} labelled for training ({cases - labelled} unlabelled left out, as the paper does), "
         f"{test_cases} held out from seed {HELDOUT_SEED} -> {out}")
    step("phantoms", t)
    planner = None
    if minutes:
        full = load_config(config)
        config = fit_to_budget(full, minutes, results)
        planner = stage2_planner(full, minutes * 60.0 - (time.perf_counter() - t0), results)
    t = time.perf_counter()
    name = config if isinstance(config, str) else config["name"]
    _say(f"2/6 training (config {name}, {folds} fold{'s' if folds > 1 else ''}): locator, stage 1, pseudo-labels, "
         f"stage 2; log: {out / 'checkpoints' / 'train.log'}")
    train = run_all(train_dir, out / "checkpoints", config=config, folds=folds, quiet=True, plan_stage2=planner)
    results["training"] = {k: train.get(k) for k in ("n_training", "n_fully_labelled", "n_pseudolabelled", "seconds")}
    step("train", t)
    t = time.perf_counter()
    _say("3/6 exporting fp32 + fp16 ONNX with verification")
    bundle = export_bundle(out / "checkpoints", out / "bundle", fp16=True, verify=True, progress=False,
                           command="flare-demo")
    step("export", t)
    t = time.perf_counter()
    tests = heldout_entries(test_dir)
    _say(f"4/6 flare-run on all {len(tests)} held-out phantoms and the real CT")
    scored = score_bundle(bundle, tests, out_dir=out / "heldout_seg")
    results["heldout"] = scored["paper"]
    results["heldout"]["seconds_per_case"] = scored["seconds_per_case"]
    real = shared_data_dir() / "ts_abdomen_ct_3mm.nii.gz"
    if real.is_file():
        seg = Segmenter(bundle, device="auto")
        results["real_ct"] = segment_and_score(seg, real, shared_data_dir() / "ts_abdomen_labels_flare_ids.nii.gz",
                                               out / "real_ct_seg.nii.gz")
    step("run", t)
    if bench:
        t = time.perf_counter()
        _say("5/6 flare-bench: the runtime against the MONAI/PyTorch reference with the same settings (mirror), "
             "the smallest held-out phantom")
        from flare.benchmarks.harness import run_benchmark

        smallest = min((Path(e["image"]) for e in tests), key=lambda f: f.stat().st_size)
        rep = run_benchmark(bundle, [smallest], reference=True, reference_mode="mirror",
                            out_dir=out / "bench", repeats=1, cold=0, device="auto", quiet=True, command="flare-demo")
        results["bench_report"] = str(out / "bench" / "report.md")
        results["bench"] = bench_summary(rep)
        step("bench", t)
    if install:
        target = install_default_bundle(bundle, default_bundle_dir())
        results["default_bundle"] = str(target)
        _say(f"6/6 installed the bundle as the default bundle: {target}")
    times["total"] = round(time.perf_counter() - t0, 1)
    results["load_after"] = [round(v, 2) for v in os.getloadavg()]
    summary = {"out": str(out), "bundle": str(bundle), "seconds": times, "results": results}
    write_text_atomic(out / "demo.json", json.dumps(summary, indent=1) + "\n")
    for line in summary_lines(summary):
        typer.echo(line)
    return summary


def stage2_planner(full: dict[str, Any], left_s: float, results: dict[str, Any]):
    """``run_all``'s ``plan_stage2`` for a demo with ``left_s`` seconds left when training starts: before stage 2 it
    measures how fast stage 1 actually trained and fits stage 2's steps to the time that is left (the load may
    have changed since the probe, in either direction); records and says it when stage 2 is cut."""
    from flare.train.config import deep_merge

    start = time.perf_counter()
    epochs2 = int(full.get("stage2", {}).get("epochs", full["train"]["epochs"]))
    spe_full = int(full["train"]["steps_per_epoch"])

    def plan(cfg: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        stage1_steps = int(cfg["train"]["epochs"]) * int(cfg["train"]["steps_per_epoch"])
        step_s = summary["seconds"]["stage1"] / max(1, stage1_steps)
        fraction = stage2_fraction(left_s - (time.perf_counter() - start), step_s, epochs2 * spe_full)
        results.setdefault("budget", {})["stage2_steps_fraction"] = round(fraction, 3)
        if fraction < 1.0:
            _say(f"stage 2: {fraction:.0%} of its steps fit in the time left (stage 1 trained at {step_s:.2f} s a step)")
        return deep_merge(cfg, {"train": {"steps_per_epoch": _scaled_steps(spe_full, fraction, 10)}})

    return plan


def fit_to_budget(cfg: dict[str, Any], minutes: float, results: dict[str, Any]) -> dict[str, Any]:
    """Probe this machine's training speed now and scale the (loaded) config's steps so that the demo ends in about
    ``minutes``; records the decision in ``results["budget"]`` and says it when steps are cut."""
    probe = probe_step_seconds(cfg)
    fraction, slow = budget_fraction(minutes, probe)
    results["budget"] = {"minutes": minutes, "probe_step_s": round(probe, 3), "slowdown": round(slow, 2),
                         "steps_fraction": round(fraction, 3)}
    if fraction >= 1.0:
        return cfg
    _say(f"slower or busy CPU: a training step takes {slow:.1f}x as long as on the idle box the demo was sized on; "
         f"training {fraction:.0%} of its steps to end in about {minutes:g} min (lower Dice; --minutes 0 trains them "
         "all)")
    return scale_steps(cfg, fraction)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The demo's closing table: headline Dice over every held-out phantom, then per class (two columns)."""
    r = summary["results"]
    h = r["heldout"]["summary"]
    headline = (f"held-out phantoms ({h['cases']} cases, unseen seed) through flare-run: 13-organ mean Dice "
                f"{h['organ_mean']}, six large organs {h['large6_mean']}, tumor {h['tumor']}")
    lines = [headline]
    names = list(h["per_class"].items())
    half = -(-len(names) // 2)
    for i in range(half):
        cells = [f"{n:<22} {v:5.3f}" for n, v in names[i::half]]
        lines.append("  " + "    ".join(cells))
    if "real_ct" in r:
        lines.append(f"real CT (the networks saw only phantoms): 13-organ mean Dice {r['real_ct'].get('organ_mean_dice')}")
    load = r.get("load_before")
    budget = r.get("budget") or {}
    first, second = budget.get("steps_fraction", 1.0), budget.get("stage2_steps_fraction", 1.0)
    if min(first, second) < 1.0:
        lines.append(f"slower or busy CPU: trained {first:.0%} of the locator's and stage 1's steps and {second:.0%} "
                     "of stage 2's to end in time (lower Dice); --minutes 0 trains them all")
    lines.append(f"total {summary['seconds']['total']:.0f} s (load average at start {load[0] if load else 'n/a'} on "
                 f"{os.cpu_count()} CPUs); numbers: {summary['out']}/demo.json")
    if "bench_report" in r:
        b = r.get("bench") or {}
        lines.append(f"bench on {b.get('case')}: flare-run {b.get('runtime_s')} s, MONAI reference with the same "
                     f"settings {b.get('reference_s')} s, labels agree (Dice) {b.get('agreement')}")
        lines.append(f"benchmark report: {r['bench_report']}")
    if "default_bundle" in r:
        lines.append(f"default bundle: {r['default_bundle']} — now try: flare-run CT.nii.gz -o seg.nii.gz")
    return lines


def bench_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The demo's benchmark in one record: warm runtime seconds, reference seconds (``mirror``: the runtime's own
    steps in MONAI/PyTorch, not the Auto3DSeg-like peer of ``flare-bench --reference-mode whole-image-nearest``) and
    the mean per-class Dice between their labels."""
    case = report["cases"][0]

    def med(part: str) -> float | None:
        v = ((case.get(part) or {}).get("wall_s") or {}).get("median")
        return None if v is None else round(float(v), 2)

    dice = case.get("dice") or {}
    return {"case": case["name"], "mode": report.get("reference_mode"), "runtime_s": med("warm"),
            "reference_s": med("reference"),
            "agreement": round(float(np.mean(list(dice.values()))), 4) if dice else None}


def main() -> None:
    import warnings

    from flare.train.engine import torch_setup

    # the demo's output is its table: library deprecation notices (MONAI, numpy on flush-to-zero CPUs) are not
    # for its reader; PYTHONWARNINGS carries the filter into worker processes
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.simplefilter("ignore")

    torch_setup(2)  # before anything imports torch: picks the OpenMP wait policy from the CPU load (see its doc)
    app()


if __name__ == "__main__":  # python -m: through the console script's funnel (extras, signal exits)
    from flare.runtime.app.entrypoints import launch

    launch("flare-demo")
