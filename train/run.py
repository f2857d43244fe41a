"""The whole pipeline: locator -> stage 1 (fully labelled cases) -> pseudo-labels -> stage 2 (all cases), K folds,
then the stage-2 ensemble evaluated on the held-out cases. Resumable: a step whose folder holds ``done.json`` is
skipped, an interrupted one continues from its ``last.pt``, an existing ``dataset_stage2.json`` is reused.
Runs under ``torchrun`` as well (every step is DistributedDataParallel, pseudo-labelling is sharded over ranks).

Output folder (``flare-export`` reads ``locator/`` and ``fold*/``)::

    OUT/locator/          model.pt, config.json, last.pt, done.json
    OUT/stage1/fold0..4/  stage-1 models
    OUT/pseudolabels/     FLARE-id label files (given labels + pseudo-labelled missing organs)
    OUT/dataset_stage2.json   paths relative to OUT
    OUT/fold0..4/         stage-2 models (the deployed ensemble)
    OUT/cache/            preprocessed cases (``data.cache: disk``; delete when done)
    OUT/tensorboard/      TensorBoard scalars per model
    OUT/train.log, OUT/summary.json
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.bundle.card import CARD_FILE, ModelCard
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.atomic import write_text_atomic
from flare.runtime.foundation.errors import InputError, OutputError

from .config import load_config, role_config
from .datalist import (
    assign_folds,
    draw_folds,
    folds_of,
    fully_labelled,
    given_ids,
    load_datalist,
    relative_to,
    write_datalist,
)
from .distributed import Dist, barrier, setup
from .runlog import RunLog


def cache_root(cfg: dict[str, Any], out: Path) -> Path | None:
    """Where ``data.cache: disk`` keeps preprocessed cases: ``data.cache_dir`` (relative: to ``out``) or
    ``out/cache``."""
    from .data import data_config

    data = data_config(cfg)
    if data["cache"] != "disk":
        return None
    return out / (data["cache_dir"] or "cache")


def full_cases(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries whose given label has all 13 organs."""
    return [e for e in entries if fully_labelled(given_ids(e))]


#: offset of the stage-1 split's seed from ``train.seed``
STAGE1_SPLIT_SEED = 1


def fold_sets(entries: list[dict[str, Any]], fold: int, stage: int, folds: int = 5,
              seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, validation) of a fold. The paper draws two independent splits: stage 1 trains and validates on
    the fully labelled cases dealt into ``folds`` by a permutation seeded with ``seed + STAGE1_SPLIT_SEED``; stage 2
    uses the datalist's folds (``fold % folds``) over every case (pseudo-labelled) and validates on all of the
    fold's cases, fully and partially labelled, against the labels they came with. ``folds == 1``: one model trained
    on every case, no validation."""
    cases = full_cases(entries) if stage == 1 else entries
    if folds == 1:
        return list(cases), []
    if stage == 1:
        return folds_of(draw_folds(cases, folds, seed + STAGE1_SPLIT_SEED), fold)
    return folds_of([{**e, "fold": int(e["fold"]) % folds} for e in cases], fold)


def load_nets(folders: list[Path], device: Any) -> list[Any]:
    from .checkpoints import load_network

    return [load_network(f)[0].to(device) for f in folders]


class Trainer:
    """One place that runs ``fit`` for a step of the pipeline (skip when finished, resume when interrupted)."""

    def __init__(self, cfg: dict[str, Any], out: Path, log: RunLog, dist: Dist, *, resume: bool = True) -> None:
        self.cfg, self.out, self.log, self.dist, self.resume = cfg, out, log, dist, resume

    def __call__(self, role: str, train: list[dict[str, Any]], val: list[dict[str, Any]], folder: Path,
                 fold: int | None = None, stage: int | None = None, init: Path | None = None,
                 cfg: dict[str, Any] | None = None) -> dict[str, Any]:
        from .checkpoints import load_checkpoint
        from .engine import finished, fit

        done = finished(folder) if self.resume else None
        name = relative_to(folder, self.out)
        if done is not None:
            self.log(f"{name}: finished before, skipped")
            return done
        self.log(f"{name}: {len(train)} training / {len(val)} validation cases")
        state = load_checkpoint(init)["state_dict"] if init is not None else None
        res = fit(cfg or self.cfg, role, train, val, folder, fold=fold, stage=stage, init_state=state,
                  resume=self.resume, log=self.log, dist=self.dist, cache_dir=cache_root(self.cfg, self.out),
                  tensorboard=self.out / "tensorboard" / name.replace("/", "-"))
        self.log(f"{name}: best mean Dice {res['best_metric']:.4f} at epoch {res['best_epoch']}")
        return {k: v for k, v in res.items() if k != "net"}


def train_locator(trainer: Trainer, full: list[dict[str, Any]]) -> dict[str, Any]:
    """Binary organ-union locator on the fully labelled cases (fold 0 of the stage-1 split validates)."""
    train, val = fold_sets(full, 0, 1, seed=int(trainer.cfg["train"].get("seed", 0)))
    return trainer("locator", train or full, val, trainer.out / "locator")


def train_folds(trainer: Trainer, entries: list[dict[str, Any]], stage: int, folds: int, *,
                cfg: dict[str, Any] | None = None, init_dirs: list[Path] | None = None) -> list[dict[str, Any]]:
    """Train folds 0..folds-1 of ``stage`` (stage 1 -> OUT/stage1/foldK, stage 2 -> OUT/foldK)."""
    results = []
    for k in range(folds):
        train, val = fold_sets(entries, k, stage, folds, int(trainer.cfg["train"].get("seed", 0)))
        folder = trainer.out / ("stage1" if stage == 1 else "") / f"fold{k}"
        res = trainer("fold", train, val, folder, fold=k, stage=stage, init=init_dirs[k] if init_dirs else None,
                      cfg=cfg)
        results.append({"fold": k, **{key: v for key, v in res.items() if key != "losses"},
                        "first_loss": res["losses"][0], "last_loss": res["losses"][-1]})
    return results


def evaluate_holdout(fold_dirs: list[Path], entries: list[dict[str, Any]], cfg: dict[str, Any], dist: Dist,
                     cache: Path | None = None) -> dict[str, Any]:
    """Ensemble Dice per FLARE class (left/right split) on held-out cases against ``label_full`` (or ``label``),
    training space, sharded over ranks; classes absent from a case's truth are skipped."""
    from .data import eval_dataset
    from .engine import evaluate

    key = "label_full" if all(e.get("label_full") for e in entries) else "label"
    eff = role_config(cfg, "fold")
    ds = eval_dataset([e for e in entries if e.get(key)], eff, cache, label_key=key)
    res = evaluate(load_nets(fold_dirs, dist.device), ds, eff, dist.device, dist)
    per_class = {L.name_of(c): round(v, 4) for c, v in res["per_class"].items()}
    organs = [v for c, v in res["per_class"].items() if c != L.TUMOR]
    return {"truth": key, "cases": res["cases"], "per_class": per_class,
            "organ_mean": round(float(np.mean(organs)), 4) if organs else None,
            "tumor": per_class.get(L.name_of(L.TUMOR))}


def data_kind(doc: dict[str, Any]) -> str:
    """``synthetic``/``real`` from the datalist's own ``synthetic`` flag (the phantoms set it), else ``unknown``."""
    flag = doc.get("synthetic")
    return "unknown" if flag is None else ("synthetic" if flag else "real")


def training_card(doc: dict[str, Any], cfg: dict[str, Any], entries: list[dict[str, Any]],
                  summary: dict[str, Any]) -> dict[str, Any]:
    """The model card of this training (``OUT/card.json``, copied into the bundle by flare-export): the data set,
    case count, recipe, date and the validation Dice per class (held-out ensemble when there are held-out cases,
    else the mean over the folds' best validation)."""
    dice: dict[str, float] = {}
    holdout = summary.get("holdout")
    if holdout:
        dice = {k: float(v) for k, v in holdout["per_class"].items() if math.isfinite(v)}
        how = f"held-out ensemble Dice, {holdout['cases']} case(s) vs {holdout['truth']}"
    else:
        per_fold = [f.get("val_per_class") or {} for f in summary.get("stage2", [])]
        for name in {k for f in per_fold for k in f}:
            vals = [float(f[name]) for f in per_fold if name in f and math.isfinite(f[name])]
            if vals:
                dice[name] = round(sum(vals) / len(vals), 4)
        how = f"mean over {len(per_fold)} fold(s) of each fold's best validation Dice"
    card = ModelCard(dataset=str(doc.get("name") or Path(doc["_path"]).parent.name), cases=len(entries),
                     data=data_kind(doc), recipe=str(cfg["name"]), trained_at=ModelCard.today(), validation=how,
                     validation_dice={k: min(1.0, max(0.0, v)) for k, v in sorted(dice.items())})
    return card.to_json()


def run_all(datalist_or_dir: str | Path, out_dir: str | Path, config: str | Path | dict[str, Any] = "tiny",
            folds: int = 5, *, overrides: dict[str, Any] | None = None, naive: bool = False, locator: bool = True,
            quiet: bool = False, threads: int | None = 2, include_unlabelled: bool = False,
            resume: bool = True, plan_stage2: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
            ) -> dict[str, Any]:
    """locator + stage 1 + pseudo-labels + stage 2 over ``folds`` folds, then held-out Dice; returns the summary.
    ``plan_stage2(cfg, summary so far)``, when given, returns the config stage 2 trains with (``flare-demo`` fits
    its steps to the time left).

    ``naive=True`` is the ablation baseline: no stage 1 / pseudo-labels, the folds train once on the partial labels
    as given (missing organs count as background) for as many epochs as stage 1 and 2 together.
    ``resume`` (default) skips finished steps and continues interrupted ones.
    """
    from .engine import STAGE2_TRAIN_KEYS, torch_setup

    torch_setup(threads)
    t0 = time.perf_counter()
    out = Path(out_dir)
    cfg = load_config(config, overrides)
    doc = load_datalist(datalist_or_dir, include_unlabelled=include_unlabelled)  # refused before OUT is made
    entries = assign_folds(doc["training"], folds)
    full = full_cases(entries)
    if not full and not naive:
        raise InputError(doc["_path"], "no fully labelled case (all 13 organs) for stage 1")
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    dist = setup(timeout_min=cfg["train"].get("dist_timeout_min"))
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(dist)
    log = RunLog(out / "train.log", quiet=quiet, enabled=dist.main)
    log(f"config {cfg['name']}: {len(entries)} training cases ({len(full)} fully labelled), "
        f"{len(doc['unlabeled'])} unlabelled {'included' if include_unlabelled else 'left out'}, "
        f"{len(doc.get('testing') or [])} held out, {folds} folds, {dist.world} rank(s){' (naive)' if naive else ''}")
    summary: dict[str, Any] = {"config": cfg["name"], "datalist": relative_to(doc["_path"], out), "folds": folds,
                               "naive": naive, "n_training": len(entries), "n_fully_labelled": len(full),
                               "ranks": dist.world, "seconds": {}}
    trainer = Trainer(cfg, out, log, dist, resume=resume)

    def timed(name: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        res = fn(*args, **kw)
        summary["seconds"][name] = round(time.perf_counter() - t, 1)
        return res

    if locator and full:
        summary["locator"] = {k: v for k, v in timed("locator", train_locator, trainer, full).items()
                              if k != "losses"}
    if naive:
        epochs = int(cfg["train"]["epochs"]) + int(cfg.get("stage2", {}).get("epochs", cfg["train"]["epochs"]))
        # from scratch, as long as both stages, on train's schedule: stage 2's lr is for fine-tuning stage-1 weights
        stage2 = {k: v for k, v in cfg.get("stage2", {}).items() if k not in STAGE2_TRAIN_KEYS}
        naive_cfg = {**cfg, "stage2": {**stage2, "epochs": epochs}}
        summary["stage2"] = timed("stage2", train_folds, trainer, entries, 2, folds, cfg=naive_cfg)
    else:
        summary["stage1"] = timed("stage1", train_folds, trainer, entries, 1, folds)
        stage2_file = out / "dataset_stage2.json"
        if resume and stage2_file.is_file():
            log(f"{stage2_file.name}: exists, pseudo-labelling skipped")
            stage2_entries = load_datalist(stage2_file, include_unlabelled=True)["training"]
        else:
            stage2_entries = timed("pseudolabel", pseudolabel_stage, cfg, entries, out, folds, log, dist)
        summary["n_pseudolabelled"] = sum(1 for e in stage2_entries if "label_given" in e)
        init = [out / "stage1" / f"fold{k}" for k in range(folds)] \
            if cfg.get("stage2", {}).get("init_from_stage1") else None
        cfg2 = plan_stage2(cfg, summary) if plan_stage2 else None
        summary["stage2"] = timed("stage2", train_folds, trainer, stage2_entries, 2, folds, init_dirs=init, cfg=cfg2)
    testing = doc.get("testing") or []
    if testing:
        summary["holdout"] = h = timed("holdout", evaluate_holdout, [out / f"fold{k}" for k in range(folds)],
                                       testing, cfg, dist, cache_root(cfg, out))
        log(f"held-out Dice ({h['cases']} cases vs {h['truth']}): organ mean {h['organ_mean']}, tumor {h['tumor']}")
        log("per class: " + ", ".join(f"{k} {v:.3f}" for k, v in h["per_class"].items()))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    if dist.main:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        write_text_atomic(out / CARD_FILE, json.dumps(training_card(doc, cfg, entries, summary), indent=1) + "\n")
    log(f"done in {summary['wall_s']} s -> {out}")
    return summary


def pseudolabel_stage(cfg: dict[str, Any], entries: list[dict[str, Any]], out: Path, folds: int, log: RunLog,
                      dist: Dist, stage1_dir: Path | None = None) -> list[dict[str, Any]]:
    """Pseudo-label the partially labelled ``entries`` with the stage-1 ensemble (sharded over ranks); rank 0
    writes ``OUT/dataset_stage2.json`` with paths relative to ``OUT``."""
    from .pseudolabel import pseudolabel_datalist

    stage1_dir = stage1_dir or out / "stage1"
    for k in range(folds):
        if not (stage1_dir / f"fold{k}" / "model.pt").is_file():
            raise InputError(stage1_dir / f"fold{k}", "stage-1 model missing (run fit --stage 1 first)")
    nets = load_nets([stage1_dir / f"fold{k}" for k in range(folds)], dist.device)
    new = pseudolabel_datalist(nets, entries, role_config(cfg, "fold"), dist.device, out / "pseudolabels", log=log,
                               dist=dist)
    if dist.main:
        write_datalist({"training": new}, out / "dataset_stage2.json")
    barrier(dist)
    return new
