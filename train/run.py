"""The whole pipeline: locator -> stage 1 (fully labelled cases) -> pseudo-labels -> stage 2 (all cases), K folds,
then the stage-2 ensemble evaluated on the held-out cases.

Output folder (``flare-export`` reads ``locator/`` and ``fold*/``)::

    OUT/locator/          model.pt, config.json, last.pt
    OUT/stage1/fold0..4/  stage-1 models
    OUT/pseudolabels/     FLARE-id label files (given labels + pseudo-labelled missing organs)
    OUT/dataset_stage2.json
    OUT/fold0..4/         stage-2 models (the deployed ensemble)
    OUT/analysis.json, OUT/train.log, OUT/summary.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime import labels as L
from flare.runtime.atomic import write_text_atomic
from flare.runtime.errors import InputError

from .config import load_config, role_config
from .data import folds_of, fully_labelled, label_ids, load_datalist, preprocess
from .distributed import Dist, setup
from .runlog import RunLog


class ItemCache:
    """Preprocessed cases keyed by (role, image, label): each case is loaded and resampled once per run."""

    def __init__(self, cfg: dict[str, Any], log: RunLog) -> None:
        self.cfg, self.log = cfg, log
        self.store: dict[tuple[str, str, str | None], dict[str, Any]] = {}

    def get(self, entries: list[dict[str, Any]], role: str = "fold", label_key: str = "label") -> list[dict[str, Any]]:
        eff = role_config(self.cfg, role)
        keys = [(role, e["image"], e.get(label_key)) for e in entries]
        todo = [e for e, k in zip(entries, keys, strict=True) if k not in self.store]
        if todo:
            t = time.perf_counter()
            for k, item in zip([(role, e["image"], e.get(label_key)) for e in todo],
                               preprocess(todo, eff, label_key=label_key,
                                          num_workers=int(eff["train"].get("prep_workers", 2))), strict=True):
                self.store[k] = item
            self.log(f"preprocessed {len(todo)} cases for {role} ({time.perf_counter() - t:.1f} s)")
        return [self.store[k] for k in keys]


def load_nets(folders: list[Path], device: Any) -> list[Any]:
    from .checkpoints import load_network

    return [load_network(f)[0].to(device) for f in folders]


def train_locator(cfg: dict[str, Any], full: list[dict[str, Any]], out: Path, cache: ItemCache, log: RunLog,
                  dist: Dist) -> dict[str, Any]:
    """Binary organ-union locator on the fully labelled cases (fold 0 validates)."""
    from .engine import fit

    train, val = folds_of(full, 0)
    train = train or full
    log(f"locator: {len(train)} training / {len(val)} validation cases")
    return fit(cfg, "locator", cache.get(train, "locator"), cache.get(val, "locator"), out / "locator",
               log=log, dist=dist)


def train_folds(cfg: dict[str, Any], entries: list[dict[str, Any]], val_pool: list[dict[str, Any]], out: Path,
                stage: int, folds: int, cache: ItemCache, log: RunLog, dist: Dist,
                init_dirs: list[Path] | None = None) -> list[dict[str, Any]]:
    """Train folds 0..folds-1 on ``entries`` (validation on the fold's cases of ``val_pool``)."""
    from .checkpoints import load_checkpoint
    from .engine import fit

    results = []
    for k in range(folds):
        train, _ = folds_of(entries, k)
        _, val = folds_of(val_pool, k)
        init = load_checkpoint(init_dirs[k])["state_dict"] if init_dirs else None
        log(f"stage {stage} fold {k}: {len(train)} training / {len(val)} validation cases")
        res = fit(cfg, "fold", cache.get(train), cache.get(val), out / f"fold{k}", fold=k, stage=stage,
                  init_state=init, log=log, dist=dist)
        results.append({"fold": k, **{key: v for key, v in res.items() if key != "losses"},
                        "first_loss": res["losses"][0], "last_loss": res["losses"][-1]})
    return results


def evaluate_holdout(fold_dirs: list[Path], entries: list[dict[str, Any]], cfg: dict[str, Any], cache: ItemCache,
                     device: Any) -> dict[str, Any]:
    """Ensemble Dice per merged class on held-out cases against ``label_full`` (or ``label``), training space;
    classes absent from a case's truth are skipped."""
    from .engine import evaluate, merged_class_names

    key = "label_full" if all(e.get("label_full") for e in entries) else "label"
    items = cache.get(entries, "fold", label_key=key)
    res = evaluate(load_nets(fold_dirs, device), items, role_config(cfg, "fold"), device)
    names = merged_class_names()
    per_class = {names[c]: round(v, 4) for c, v in res["per_class"].items()}
    organs = [v for c, v in res["per_class"].items() if c != L.MERGED_TUMOR]
    return {"truth": key, "cases": res["cases"], "per_class": per_class,
            "organ_mean": round(float(np.mean(organs)), 4) if organs else None,
            "tumor": per_class.get(names[L.MERGED_TUMOR])}


def assign_folds(entries: list[dict[str, Any]], folds: int) -> list[dict[str, Any]]:
    """Keep the datalist's folds; entries without one get ``index % folds``."""
    return [e if "fold" in e else {**e, "fold": i % folds} for i, e in enumerate(entries)]


def run_all(datalist_or_dir: str | Path, out_dir: str | Path, config: str | Path | dict[str, Any] = "tiny",
            folds: int = 5, *, overrides: dict[str, Any] | None = None, naive: bool = False, locator: bool = True,
            quiet: bool = False, threads: int | None = 2) -> dict[str, Any]:
    """locator + stage 1 + pseudo-labels + stage 2 over ``folds`` folds, then held-out Dice; returns the summary.

    ``naive=True`` is the ablation baseline: no stage 1 / pseudo-labels, the folds train once on the partial labels
    as given (missing organs count as background) for as many epochs as stage 1 and 2 together.
    """
    from .engine import torch_setup

    torch_setup(threads)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "train.log", quiet=quiet)
    cfg = load_config(config, overrides)
    doc = load_datalist(datalist_or_dir)
    entries = assign_folds(doc["training"], folds)
    dist = setup()
    cache = ItemCache(cfg, log)
    avail = {e["image"]: label_ids(e.get("label")) for e in entries}
    full = [e for e in entries if fully_labelled(avail[e["image"]])]
    log(f"config {cfg['name']}: {len(entries)} training cases ({len(full)} fully labelled), "
        f"{len(doc.get('testing') or [])} held out, {folds} folds{' (naive)' if naive else ''}")
    if not full and not naive:
        raise InputError(doc["_path"], "no fully labelled case (all 13 organs) for stage 1")
    summary: dict[str, Any] = {"config": cfg["name"], "datalist": doc["_path"], "folds": folds, "naive": naive,
                               "n_training": len(entries), "n_fully_labelled": len(full), "seconds": {}}
    if locator and full:
        t = time.perf_counter()
        summary["locator"] = {k: v for k, v in train_locator(cfg, full, out, cache, log, dist).items()
                              if k != "losses"}
        summary["seconds"]["locator"] = round(time.perf_counter() - t, 1)
    if naive:
        epochs = int(cfg["train"]["epochs"]) + int(cfg.get("stage2", {}).get("epochs", cfg["train"]["epochs"]))
        naive_cfg = {**cfg, "stage2": {**cfg.get("stage2", {}), "epochs": epochs}}
        t = time.perf_counter()
        summary["stage2"] = train_folds(naive_cfg, entries, full or entries, out, 2, folds, cache, log, dist)
        summary["seconds"]["stage2"] = round(time.perf_counter() - t, 1)
    else:
        t = time.perf_counter()
        summary["stage1"] = train_folds(cfg, full, full, out / "stage1", 1, folds, cache, log, dist)
        summary["seconds"]["stage1"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        stage2_entries = pseudolabel_stage(cfg, entries, out, folds, log, dist)
        summary["seconds"]["pseudolabel"] = round(time.perf_counter() - t, 1)
        summary["n_pseudolabelled"] = sum(1 for e in stage2_entries if "label_given" in e)
        init = [out / "stage1" / f"fold{k}" for k in range(folds)] \
            if cfg.get("stage2", {}).get("init_from_stage1") else None
        t = time.perf_counter()
        summary["stage2"] = train_folds(cfg, stage2_entries, full, out, 2, folds, cache, log, dist, init_dirs=init)
        summary["seconds"]["stage2"] = round(time.perf_counter() - t, 1)
    testing = doc.get("testing") or []
    if testing:
        t = time.perf_counter()
        summary["holdout"] = evaluate_holdout([out / f"fold{k}" for k in range(folds)], testing, cfg, cache,
                                              dist.device)
        summary["seconds"]["holdout"] = round(time.perf_counter() - t, 1)
        h = summary["holdout"]
        log(f"held-out Dice ({h['cases']} cases vs {h['truth']}): organ mean {h['organ_mean']}, tumor {h['tumor']}")
        log("per class: " + ", ".join(f"{k} {v:.3f}" for k, v in h["per_class"].items()))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log(f"done in {summary['wall_s']} s -> {out}")
    return summary


def pseudolabel_stage(cfg: dict[str, Any], entries: list[dict[str, Any]], out: Path, folds: int, log: RunLog,
                      dist: Dist, stage1_dir: Path | None = None) -> list[dict[str, Any]]:
    """Pseudo-label the partially labelled ``entries`` with the stage-1 ensemble; writes ``dataset_stage2.json``."""
    from .pseudolabel import pseudolabel_datalist

    stage1_dir = stage1_dir or out / "stage1"
    nets = load_nets([stage1_dir / f"fold{k}" for k in range(folds)], dist.device)
    new = pseudolabel_datalist(nets, entries, role_config(cfg, "fold"), dist.device, out / "pseudolabels", log=log)
    write_text_atomic(out / "dataset_stage2.json", json.dumps({"training": new}, indent=1) + "\n")
    return new
