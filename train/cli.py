"""flare-train: build a datalist, analyse it, train the locator and the folds, pseudo-label, or run it all.

User-facing problems (``flare.runtime.foundation.errors.FlareError``) print one line to stderr and exit 2. Heavy imports happen
inside the commands so ``--help`` is instant. Every training command runs under ``torchrun`` for multi-GPU /
multi-node DistributedDataParallel (``torchrun --standalone --nproc_per_node 8 -m flare.train.cli fit ...``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from flare.runtime.foundation.errors import FlareError

HELP = ("Train the FLARE23 recipe: datalist, analyze, locator, fit (per fold and stage), pseudolabel, or run "
        "(all steps, resumable). Also phantoms: synthetic CTs for trying it out.")
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode=None)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="named config (tiny, flare23) or a JSON file")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="checkpoint folder (CKPT_DIR)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads")]
UnlabelledOpt = Annotated[bool, typer.Option("--include-unlabelled",
                                             help="also train on (pseudo-labelled) cases without labels")]
DatalistArg = Annotated[Path, typer.Argument(help="datalist JSON (flare or Auto3DSeg) or the folder holding "
                                                  "dataset.json")]


def _fail(err: BaseException) -> NoReturn:
    """A user error (``FlareError``, also when MONAI's transforms have wrapped it in a ``RuntimeError``) is one
    line and exit 2; anything else propagates as it is."""
    cause: BaseException | None = err
    for _ in range(8):
        if cause is None or isinstance(cause, FlareError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, FlareError):
        print(f"flare-train: {cause}", file=sys.stderr)
        raise typer.Exit(2)
    # a DataLoader worker's error comes back as a RuntimeError holding the worker's traceback as text
    last = str(err).strip().splitlines()[-1:] if isinstance(err, RuntimeError) else []
    found = re.fullmatch(r"flare\.runtime\.foundation\.errors\.\w*Error: (.+)", last[0]) if last else None
    if found is None:
        raise err
    print(f"flare-train: {found.group(1)}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def phantoms(out: Annotated[Path, typer.Argument(help="output folder")],
             cases: Annotated[int, typer.Option("--cases", "-n", min=1)] = 40,
             seed: Annotated[int, typer.Option("--seed", "-s", min=0)] = 0,
             size: Annotated[int, typer.Option("--size", min=32, max=1024,
                                               help="in-plane matrix; 512 = realistic spacing")] = 512,
             holdout: Annotated[int | None, typer.Option(min=0, help="held-out cases (default cases // 10)")] = None,
             folds: Annotated[int, typer.Option(min=1)] = 5, quiet: QuietOpt = False) -> None:
    """Write synthetic abdominal CT phantoms (imagesTr, labelsTr, labelsFull, dataset.json)."""
    from rich.progress import Progress

    from .phantoms import make_phantoms

    try:
        with Progress(disable=quiet, transient=True) as bar:
            task = bar.add_task("phantoms", total=cases)
            doc = make_phantoms(out, cases, seed, size=size, holdout=holdout, folds=folds,
                                progress=lambda _i: bar.advance(task))
    except Exception as err:  # noqa: BLE001 - _fail re-raises all but user errors
        _fail(err)
    if not quiet:
        print(f"{len(doc['training'])} training + {len(doc['testing'])} held-out phantoms -> {out}/dataset.json")


@app.command()
def datalist(root: Annotated[Path, typer.Argument(help="FLARE23-style folder: imagesTr/, labelsTr/, unlabeledTr/")],
             out: Annotated[Path, typer.Option("--out", "-o", help="datalist JSON to write")],
             folds: Annotated[int, typer.Option(min=1)] = 5, seed: Annotated[int, typer.Option("--seed", "-s", min=0)] = 0,
             include_unlabelled: UnlabelledOpt = False,
             workers: Annotated[int, typer.Option(min=1, help="threads reading label files")] = 4,
             quiet: QuietOpt = False) -> None:
    """Build a datalist: label availability per case, random folds, unlabelled cases listed apart."""
    from rich.progress import Progress

    from .datalist import build_datalist

    try:
        n = sum(1 for p in (root / "labelsTr").iterdir()) if (root / "labelsTr").is_dir() else 0
        with Progress(disable=quiet, transient=True) as bar:
            task = bar.add_task("reading labels", total=n)
            doc = build_datalist(root, out, folds=folds, seed=seed, include_unlabelled=include_unlabelled,
                                 workers=workers, progress=lambda k: bar.advance(task, k))
    except Exception as err:  # noqa: BLE001 - _fail re-raises all but user errors
        _fail(err)
    print(f"{len(doc['training'])} training cases ({doc['n_fully_labelled']} fully labelled, {folds} folds), "
          f"{len(doc['unlabeled'])} unlabelled listed apart, {len(doc['testing'])} testing -> {out}")


@app.command()
def analyze(datalist: DatalistArg,
            out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file (default: beside datalist)")] = None,
            per_case: Annotated[bool, typer.Option("--per-case", help="print every case")] = False,
            include_unlabelled: UnlabelledOpt = False) -> None:
    """Print and save per-case label availability and the label-subset table."""
    from .analysis import analyze as run_analysis
    from .analysis import print_analysis, save_analysis
    from .datalist import check_json_output, datalist_files, load_datalist

    try:
        doc = load_datalist(datalist, include_unlabelled=include_unlabelled)
        target = out or Path(doc["_path"]).with_name("analysis.json")
        check_json_output(target, datalist_files(doc), "analysis")
        res = run_analysis(doc)
        save_analysis(res, target)
    except Exception as err:  # noqa: BLE001 - _fail re-raises all but user errors
        _fail(err)
    print_analysis(res, per_case=per_case)
    print(f"saved {target}")


def _setup(config: str, threads: int):
    from .config import load_config
    from .distributed import setup
    from .engine import torch_setup

    torch_setup(threads)
    cfg = load_config(config)
    return cfg, setup(timeout_min=cfg["train"].get("dist_timeout_min"))


def _fit(role: str, datalist: Path, config: str, fold: int, stage: int | None, out: Path, resume: bool,
         quiet: bool, threads: int, include_unlabelled: bool, init: Path | None = None) -> dict[str, Any]:
    from .datalist import assign_folds, load_datalist
    from .run import Trainer, fold_sets, full_cases, train_locator
    from .runlog import RunLog

    cfg, d = _setup(config, threads)
    doc = load_datalist(datalist, include_unlabelled=include_unlabelled)
    entries = assign_folds(doc["training"], 5)
    if not full_cases(entries) and not (role == "fold" and stage == 2):
        raise FlareError(doc["_path"], "no fully labelled case (all 13 organs) to train on")
    if init is not None:  # an unusable --init is refused before OUT is made
        from .checkpoints import load_checkpoint

        load_checkpoint(init)
    trainer = Trainer(cfg, out, RunLog(out / "train.log", quiet=quiet, enabled=d.main), d, resume=resume)
    if role == "locator":
        return train_locator(trainer, full_cases(entries))
    train, val = fold_sets(entries, fold, stage or 1, 5, int(cfg["train"].get("seed", 0)))
    return trainer("fold", train, val, out / ("stage1" if stage == 1 else "") / f"fold{fold}", fold=fold,
                   stage=stage, init=init)


@app.command(name="fit")
def fit_cmd(datalist: DatalistArg, config: ConfigOpt = "tiny",
            fold: Annotated[int, typer.Option("--fold", "-k", min=0, max=4, help="fold 0-4 (fit splits into five)")] = 0,
            stage: Annotated[int, typer.Option("--stage", min=1, max=2)] = 1, out: OutOpt = Path("checkpoints"),
            init: Annotated[Path | None, typer.Option(help="start from this checkpoint's weights")] = None,
            resume: Annotated[bool, typer.Option(help="continue from OUT/.../last.pt; skip a finished fold")] = False,
            include_unlabelled: UnlabelledOpt = False, quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """Train one fold: stage 1 on fully labelled cases (-> OUT/stage1/foldK), stage 2 on all (-> OUT/foldK)."""
    try:
        _fit("fold", datalist, config, fold, stage, out, resume, quiet, threads, include_unlabelled, init)
    except Exception as err:  # noqa: BLE001 - _fail re-raises all but user errors
        _fail(err)


@app.command()
def locator(datalist: DatalistArg, config: ConfigOpt = "tiny", out: OutOpt = Path("checkpoints"),
            resume: Annotated[bool, typer.Option(help="continue from OUT/locator/last.pt")] = False,
            quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """Train the organ-union locator on the fully labelled cases (-> OUT/locator)."""
    try:
        _fit("locator", datalist, config, 0, None, out, resume, quiet, threads, False)
    except Exception as err:  # noqa: BLE001 - _fail re-raises all but user errors
        _fail(err)


@app.command()
def pseudolabel(datalist: DatalistArg, config: ConfigOpt = "tiny", out: OutOpt = Path("checkpoints"),
                folds: Annotated[int, typer.Option(min=1)] = 5, include_unlabelled: UnlabelledOpt = False,
                quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """Pseudo-label missing organs with the OUT/stage1/fold* ensemble -> OUT/pseudolabels, OUT/dataset_stage2.json."""
    from .datalist import assign_folds, load_datalist
    from .run import pseudolabel_stage
    from .runlog import RunLog

    try:
        cfg, d = _setup(config, threads)
        doc = load_datalist(datalist, include_unlabelled=include_unlabelled)
        new = pseudolabel_stage(cfg, assign_folds(doc["training"], folds), out, folds,
                                RunLog(out / "train.log", quiet=quiet, enabled=d.main), d)
    except Exception as err:  # noqa: BLE001 - _fail re-raises all but user errors
        _fail(err)
    if d.main:
        print(f"{sum('label_given' in e for e in new)} cases pseudo-labelled -> {out / 'dataset_stage2.json'}")


@app.command()
def run(datalist: DatalistArg, config: ConfigOpt = "tiny", out: OutOpt = Path("checkpoints"),
        folds: Annotated[int, typer.Option(min=1)] = 5,
        naive: Annotated[bool, typer.Option(help="ablation: no pseudo-labels, train on partial labels")] = False,
        fresh: Annotated[bool, typer.Option(help="retrain finished steps instead of skipping them")] = False,
        include_unlabelled: UnlabelledOpt = False, quiet: QuietOpt = False, threads: ThreadsOpt = 2) -> None:
    """locator + stage 1 + pseudo-labels + stage 2 (all folds), then held-out Dice -> OUT/summary.json.

    Resumable: finished steps are skipped, an interrupted one continues from its last.pt.
    """
    from .run import run_all

    try:
        summary = run_all(datalist, out, config, folds, naive=naive, quiet=quiet, threads=threads,
                          include_unlabelled=include_unlabelled, resume=not fresh)
    except Exception as err:  # noqa: BLE001 - _fail re-raises all but user errors
        _fail(err)
    if "holdout" in summary and not quiet:
        print(json.dumps(summary["holdout"], indent=1))


def main() -> None:
    app()


if __name__ == "__main__":  # python -m: through the console script's funnel (extras, signal exits)
    from flare.runtime.app.entrypoints import launch

    launch("flare-train")
