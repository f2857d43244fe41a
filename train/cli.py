"""``flare-train``: phantoms | analyze | fit | locator | pseudolabel | run.

User-facing problems (``flare.runtime.errors.FlareError``) print one line to stderr and exit 2. Heavy imports happen
inside the commands so ``--help`` is instant. ``fit`` and ``locator`` run under ``torchrun`` for multi-GPU / multi-node
DistributedDataParallel (``torchrun --nproc_per_node N -m flare.train.cli fit ...``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from flare.runtime.errors import FlareError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="named config (tiny, flare23) or a JSON file")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="checkpoint folder (CKPT_DIR)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch CPU threads")]


def _fail(err: FlareError) -> None:
    print(f"flare-train: {err}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def phantoms(out: Annotated[Path, typer.Argument(help="output folder")],
             cases: Annotated[int, typer.Option("--cases", "-n", min=1)] = 40,
             seed: Annotated[int, typer.Option("--seed", "-s")] = 0,
             size: Annotated[int, typer.Option("--size", min=32, help="in-plane matrix; 512 = realistic spacing")] = 512,
             holdout: Annotated[int | None, typer.Option(help="held-out cases (default cases // 10)")] = None,
             folds: Annotated[int, typer.Option(min=1)] = 5, quiet: QuietOpt = False) -> None:
    """Write synthetic abdominal CT phantoms (imagesTr, labelsTr, labelsFull, dataset.json)."""
    from rich.progress import Progress

    from .phantoms import make_phantoms

    try:
        with Progress(disable=quiet, transient=True) as bar:
            task = bar.add_task("phantoms", total=cases)
            doc = make_phantoms(out, cases, seed, size=size, holdout=holdout, folds=folds,
                                progress=lambda _i: bar.advance(task))
    except FlareError as err:
        _fail(err)
    if not quiet:
        print(f"{len(doc['training'])} training + {len(doc['testing'])} held-out phantoms -> {out}/dataset.json")


@app.command()
def analyze(datalist: Annotated[Path, typer.Argument(help="dataset.json or its folder")],
            out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file (default: beside datalist)")] = None,
            per_case: Annotated[bool, typer.Option("--per-case", help="print every case")] = False) -> None:
    """Print and save per-case label availability and the label-subset table."""
    from .analysis import analyze as run_analysis
    from .analysis import print_analysis, save_analysis

    try:
        res = run_analysis(datalist)
        target = out or Path(res["datalist"]).with_name("analysis.json")
        save_analysis(res, target)
    except FlareError as err:
        _fail(err)
    print_analysis(res, per_case=per_case)
    print(f"saved {target}")


def _fit(role: str, datalist: Path, config: str, fold: int | None, stage: int | None, out: Path, resume: bool,
         quiet: bool, threads: int, init: Path | None = None) -> dict[str, Any]:
    from .config import load_config
    from .data import folds_of, fully_labelled, label_ids, load_datalist, preprocess
    from .distributed import setup
    from .engine import fit, torch_setup
    from .run import assign_folds, role_config
    from .runlog import RunLog

    torch_setup(threads)
    d = setup()
    cfg = load_config(config)
    doc = load_datalist(datalist)
    entries = assign_folds(doc["training"], 5)
    full = [e for e in entries if fully_labelled(label_ids(e.get("label_given") or e.get("label")))]
    train_pool = entries if (role == "fold" and stage == 2) else full
    if not train_pool:
        raise FlareError(doc["_path"], "no fully labelled case (all 13 organs) to train on")
    train, _ = folds_of(train_pool, fold or 0)
    _, val = folds_of(full, fold or 0)
    name = "locator" if role == "locator" else f"fold{fold}"
    target = out / name if (role == "locator" or stage == 2) else out / "stage1" / name
    log = RunLog(out / "train.log", quiet=quiet, enabled=d.main)
    eff = role_config(cfg, role)
    state = None
    if init is not None:
        from .checkpoints import load_checkpoint

        state = load_checkpoint(init)["state_dict"]
    log(f"{role} {name} stage {stage}: {len(train)} training / {len(val)} validation cases -> {target}")
    res = fit(cfg, role, preprocess(train, eff), preprocess(val, eff), target, fold=fold, stage=stage,
              init_state=state, resume=resume, log=log, dist=d)
    log(f"best mean Dice {res['best_metric']:.4f} at epoch {res['best_epoch']}")
    return res


@app.command(name="fit")
def fit_cmd(datalist: Annotated[Path, typer.Argument(help="dataset.json (stage 2: dataset_stage2.json)")],
            config: ConfigOpt = "tiny", fold: Annotated[int, typer.Option("--fold", "-k", min=0)] = 0,
            stage: Annotated[int, typer.Option("--stage", min=1, max=2)] = 1, out: OutOpt = Path("checkpoints"),
            init: Annotated[Path | None, typer.Option(help="start from this checkpoint's weights")] = None,
            resume: Annotated[bool, typer.Option(help="continue from OUT/.../last.pt")] = False,
            quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """Train one fold: stage 1 on fully labelled cases (-> OUT/stage1/foldK), stage 2 on all (-> OUT/foldK)."""
    try:
        _fit("fold", datalist, config, fold, stage, out, resume, quiet, threads, init)
    except FlareError as err:
        _fail(err)


@app.command()
def locator(datalist: Annotated[Path, typer.Argument(help="dataset.json")], config: ConfigOpt = "tiny",
            out: OutOpt = Path("checkpoints"), resume: Annotated[bool, typer.Option()] = False,
            quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """Train the organ-union locator on the fully labelled cases (-> OUT/locator)."""
    try:
        _fit("locator", datalist, config, None, None, out, resume, quiet, threads)
    except FlareError as err:
        _fail(err)


@app.command()
def pseudolabel(datalist: Annotated[Path, typer.Argument(help="dataset.json")], config: ConfigOpt = "tiny",
                out: OutOpt = Path("checkpoints"), folds: Annotated[int, typer.Option(min=1)] = 5,
                quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """Pseudo-label missing organs with the OUT/stage1/fold* ensemble -> OUT/pseudolabels, OUT/dataset_stage2.json."""
    from .config import load_config
    from .data import load_datalist
    from .distributed import setup
    from .engine import torch_setup
    from .run import assign_folds, pseudolabel_stage
    from .runlog import RunLog

    torch_setup(threads)
    try:
        for k in range(folds):
            if not (out / "stage1" / f"fold{k}" / "model.pt").is_file():
                raise FlareError(out / "stage1" / f"fold{k}", "stage-1 model missing (run fit --stage 1 first)")
        cfg = load_config(config)
        doc = load_datalist(datalist)
        new = pseudolabel_stage(cfg, assign_folds(doc["training"], folds), out, folds, RunLog(out / "train.log",
                                quiet=quiet), setup())
    except FlareError as err:
        _fail(err)
    print(f"{sum('label_given' in e for e in new)} cases pseudo-labelled -> {out / 'dataset_stage2.json'}")


@app.command()
def run(datalist: Annotated[Path, typer.Argument(help="dataset.json or its folder")], config: ConfigOpt = "tiny",
        out: OutOpt = Path("checkpoints"), folds: Annotated[int, typer.Option(min=1)] = 5,
        naive: Annotated[bool, typer.Option(help="ablation: no pseudo-labels, train on partial labels")] = False,
        quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """locator + stage 1 + pseudo-labels + stage 2 (all folds), then held-out Dice -> OUT/summary.json."""
    from .run import run_all

    try:
        summary = run_all(datalist, out, config, folds, naive=naive, quiet=quiet, threads=threads)
    except FlareError as err:
        _fail(err)
    if "holdout" in summary:
        print(json.dumps(summary["holdout"], indent=1))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
