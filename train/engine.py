"""Training engine: loss, optimiser and schedule, the epoch loop, sliding-window prediction, Dice, ``fit``.

The recipe (paper): DiceFocal loss summed over the deep-supervision outputs with exponentially decreasing weights
(MONAI ``DeepSupervisionLoss(weight_mode="exp")``), AdamW (lr 2e-4, weight decay 1e-5), warmup-cosine per step
(``warmup_epochs`` epochs of warmup), AMP on CUDA, validation Dice per class with sliding windows, best checkpoint
by mean Dice. Dice skips classes absent from a case's ground truth (the paper's Table 4 rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime import labels as L

from .config import checkpoint_config, role_config
from .distributed import Dist, barrier, shard, unwrap, wrap
from .runlog import RunLog


def torch_setup(threads: int | None = None) -> None:
    """CPU threads and flush-to-zero: trained weights produce denormal floats that slow CPU convolutions ~5x.

    When other processes already load the CPU (1-minute load average >= 1 before torch is imported) and
    ``OMP_WAIT_POLICY`` is unset, idle OpenMP threads are made to sleep instead of spin (``PASSIVE``): on the shared
    2-core box, spinning threads of a 2-thread torch waited for descheduled partners and a tiny-recipe step took
    3.96 s instead of 0.25 s (load 4.5). On an idle CPU spinning is faster (0.11 s vs 0.17 s per step), so it is
    kept there.
    """
    import os
    import sys

    if "torch" not in sys.modules and int(threads or 0) != 1 and os.getloadavg()[0] >= 1.0:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    torch.set_flush_denormal(True)


LOSSES = ("DiceFocal", "DiceCE")


def make_loss(eff: dict[str, Any]):
    """``train.loss`` (DiceFocal, the paper's, or DiceCE) with softmax over the merged classes or sigmoid for the
    1-channel locator, deep-supervised; ``train.batch_dice`` computes Dice over the whole batch (MONAI ``batch``)."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss

    tr = eff["train"]
    name = tr.get("loss", "DiceFocal")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (expected one of {', '.join(LOSSES)})")
    cls = DiceFocalLoss if name == "DiceFocal" else DiceCELoss
    batch = bool(tr.get("batch_dice", False))
    if eff.get("labels") == "organ-union":
        base = cls(sigmoid=True, batch=batch)
    else:
        base = cls(to_onehot_y=True, softmax=True, batch=batch)
    net = eff["network"]
    if net["name"] == "SegResNetDS" and int(net.get("dsdepth", 1)) > 1:
        return DeepSupervisionLoss(base, weight_mode=tr.get("deep_supervision_weights", "exp"))
    return base


def make_optimizer(net: Any, eff: dict[str, Any], total_steps: int, warmup_steps: int):
    """AdamW + MONAI's WarmupCosineSchedule stepped once per iteration."""
    import torch
    from monai.optimizers import WarmupCosineSchedule

    tr = eff["train"]
    opt = torch.optim.AdamW(net.parameters(), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    sched = WarmupCosineSchedule(opt, warmup_steps=max(1, warmup_steps), t_total=max(2, total_steps),
                                 warmup_multiplier=0.1)
    return opt, sched


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def train_steps(net: Any, batches: Iterator[Any], loss_fn: Any, opt: Any, sched: Any, scaler: Any, device: Any,
                steps: int, amp: bool) -> float:
    """Run ``steps`` optimisation steps; returns the mean loss."""
    import torch

    net.train()
    total = 0.0
    for _ in range(steps):
        batch = next(batches)
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True).float()
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            out: Any = net(x)
        outs = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        loss = loss_fn(outs, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if sched is not None:
            sched.step()
        total += float(loss.detach())
    return total / max(1, steps)


def predict_logits(net: Any, image: Any, eff: dict[str, Any], device: Any) -> Any:
    """Sliding-window logits (1, C, X, Y, Z) on the CPU for one preprocessed image (1, X, Y, Z)."""
    import torch
    from monai.inferers import sliding_window_inference

    val = eff.get("validation", {})
    x = torch.as_tensor(image, dtype=torch.float32)[None]
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=bool(eff["train"].get("amp")) and device.type == "cuda"):
        out: Any = sliding_window_inference(x.to(device), roi_size=[int(v) for v in eff["roi"]],
                                       sw_batch_size=int(val.get("sw_batch_size", 1)), predictor=net,
                                       overlap=float(val.get("overlap", 0.0)), mode=val.get("mode", "constant"),
                                       device=torch.device("cpu"))
    return out.float()


def segment(nets: list[Any], image: Any, eff: dict[str, Any], device: Any) -> np.ndarray:
    """Ensemble prediction (mean softmax or mean sigmoid) -> class map (X, Y, Z) uint8."""
    import torch

    acc = None
    for net in nets:
        logits = predict_logits(net, image, eff, device)[0]
        prob = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, 0)
        acc = prob if acc is None else acc.add_(prob)
    assert acc is not None
    if acc.shape[0] == 1:
        return (acc[0] > 0.5 * len(nets)).numpy().astype(np.uint8)
    return acc.argmax(0).numpy().astype(np.uint8)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Dice of each class in ``classes`` that is present in ``truth`` (absent classes are skipped)."""
    out = {}
    for c in classes:
        g = truth == c
        ng = int(g.sum())
        if ng == 0:
            continue
        p = pred == c
        out[c] = 2.0 * int((p & g).sum()) / (int(p.sum()) + ng)
    return out


def merged_class_names() -> list[str]:
    """Names of the 13 merged classes ("kidneys", "adrenal glands" for the merged pairs)."""
    merged_pairs = {right for right, _ in L.LEFT_RIGHT_PAIRS}
    names = []
    for fid in L.MERGED_TO_FLARE:
        name = L.name_of(int(fid))
        names.append(name.replace("right ", "") + "s" if int(fid) in merged_pairs else name)
    return names


def summarise_dice(per_case: list[dict[int, float]], classes: list[int]) -> dict[str, Any]:
    """Mean Dice per class over the cases that have it, and the mean over classes."""
    per_class = {}
    for c in classes:
        vals = [d[c] for d in per_case if c in d]
        if vals:
            per_class[c] = float(np.mean(vals))
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"mean": mean, "per_class": per_class, "cases": len(per_case)}


def evaluate(nets: list[Any], items: list[dict[str, Any]], eff: dict[str, Any], device: Any) -> dict[str, Any]:
    """Ensemble Dice on preprocessed items (labels in the role's label space)."""
    union = eff.get("labels") == "organ-union"
    classes = [1] if union else list(range(1, L.NUM_MERGED_CLASSES))
    per_case = []
    for item in items:
        pred = segment(nets, item["image"], eff, device)
        per_case.append(dice_per_class(pred, np.asarray(item["label"])[0], classes))
    return summarise_dice(per_case, classes)


def _loader(items: list[dict[str, Any]], eff: dict[str, Any], seed: int):
    import torch
    from monai.data import list_data_collate

    from .data import AugmentedDataset

    ds: Any = AugmentedDataset(items, eff)
    ds.transform.set_random_state(seed=seed)
    workers = int(eff["train"].get("num_workers", 0))
    return torch.utils.data.DataLoader(ds, batch_size=int(eff["train"].get("batch_size", 1)), shuffle=True,
                                       num_workers=workers, collate_fn=list_data_collate,
                                       generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=workers > 0)


def fit(cfg: dict[str, Any], role: str, train_items: list[dict[str, Any]], val_items: list[dict[str, Any]],
        out_folder: str | Path, *, fold: int | None = None, stage: int | None = None,
        init_state: dict[str, Any] | None = None, resume: bool = False, log: RunLog | None = None,
        dist: Dist | None = None) -> dict[str, Any]:
    """Train one model (``role`` "fold" or "locator") on preprocessed items; best model -> ``out_folder/model.pt``.

    ``out_folder/last.pt`` holds the latest state (optimizer, scheduler, epoch) for ``resume``.
    Returns ``{"best_metric", "best_epoch", "epochs", "losses", "seconds"}``.
    """
    import torch

    from .checkpoints import load_checkpoint, save_checkpoint
    from .distributed import setup
    from .networks import build_network

    log = log or RunLog(quiet=True)
    d = dist or setup()
    eff = role_config(cfg, role)
    tr = eff["train"]
    epochs = int(cfg.get("stage2", {}).get("epochs", tr["epochs"])) if (role == "fold" and stage == 2) \
        else int(tr["epochs"])
    out_folder = Path(out_folder)
    ck_cfg = checkpoint_config(cfg, role, fold, stage)
    seed = int(tr.get("seed", 0)) + 1000 * (stage or 0) + (fold or 0)
    torch.manual_seed(seed)
    net = build_network(eff["network"]).to(d.device)
    if init_state is not None:
        net.load_state_dict(init_state)
    my_items = shard(train_items, d)
    if not my_items:
        raise ValueError(f"{out_folder}: no training cases for {role} fold {fold} stage {stage}")
    steps = int(tr.get("steps_per_epoch") or max(1, len(my_items) // int(tr.get("batch_size", 1))))
    opt, sched = make_optimizer(net, eff, epochs * steps, int(tr.get("warmup_epochs", 0)) * steps)
    amp = bool(tr.get("amp")) and d.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start, best, best_epoch, losses = 0, -math.inf, -1, []
    last = out_folder / "last.pt"
    if resume and last.is_file():
        state = load_checkpoint(last)
        net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best, best_epoch = int(state["epoch"]) + 1, float(state["best_metric"]), int(state["best_epoch"])
        losses = list(state.get("losses", []))
        log(f"{out_folder.name}: resumed at epoch {start}")
    model = wrap(net, d)
    loss_fn = make_loss(eff)
    batches = _cycle(_loader(my_items, eff, seed + 7919 * d.rank))
    t0 = log.elapsed()
    val_every = int(tr.get("val_every", 1))
    for epoch in range(start, epochs):
        losses.append(train_steps(model, batches, loss_fn, opt, sched, scaler, d.device, steps, amp))
        is_val = val_items and ((epoch + 1) % val_every == 0 or epoch == epochs - 1)
        if d.main:
            msg = f"{out_folder.name} epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}"
            if is_val:
                metric = evaluate([unwrap(model)], val_items, eff, d.device)["mean"]
                msg += f" val dice {metric:.4f}"
                if metric > best:
                    best, best_epoch = metric, epoch
                    save_checkpoint(out_folder, unwrap(model), ck_cfg, epoch=epoch, best_metric=best)
            elif not val_items and epoch == epochs - 1:
                best_epoch = epoch
                save_checkpoint(out_folder, unwrap(model), ck_cfg, epoch=epoch)
            save_checkpoint(out_folder, unwrap(model), ck_cfg, epoch=epoch, best_metric=best, filename="last.pt",
                            extra={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "best_epoch": best_epoch, "losses": losses})
            log(msg)
        barrier(d)
    return {"best_metric": best if best > -math.inf else float("nan"), "best_epoch": best_epoch + 1,
            "epochs": epochs, "losses": losses, "seconds": log.elapsed() - t0}
