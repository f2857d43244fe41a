"""Training engine: loss, optimiser and schedule, the epoch loop, sliding-window prediction, Dice, ``fit``.

The recipe (paper): DiceFocal loss summed over the deep-supervision outputs with exponentially decreasing weights
(MONAI ``DeepSupervisionLoss(weight_mode="exp")``), AdamW (lr 2e-4, weight decay 1e-5), warmup-cosine per step
(``warmup_epochs`` epochs of warmup), AMP on CUDA, validation Dice per class with sliding windows, best checkpoint
by mean Dice. Dice skips classes absent from a case's ground truth (the paper's Table 4 rule). ``train.grad_clip``
(not in the paper, off by default) clips the global gradient norm of every step, for the short high-learning-rate
runs of the proof.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.errors import InputError

from .config import checkpoint_config, infer_roi, role_config
from .distributed import Dist, barrier, gather, unwrap, wrap
from .runlog import RunLog


def busy_cores(window_s: float = 0.5) -> float:
    """How many CPU cores other processes keep busy right now: non-idle time in ``/proc/stat`` over ``window_s``
    seconds while this process sleeps, in cores. Where ``/proc/stat`` is missing (macOS, Windows), the 1-minute
    load average, which lags: it still counts a job that ended seconds ago (on this box, ``make demo``'s pip install)."""
    import os
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    first = sample()
    if first is None:
        return float(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0
    time.sleep(window_s)
    second = sample()
    if second is None or second[1] <= first[1]:
        return 0.0
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def torch_setup(threads: int | None = None) -> None:
    """CPU threads and flush-to-zero: trained weights produce denormal floats that slow CPU convolutions ~5x.

    When other processes keep at least half a core busy (:func:`busy_cores`, measured over half a second before
    torch is imported) and ``OMP_WAIT_POLICY`` is unset, idle OpenMP threads are made to sleep instead of spin
    (``PASSIVE``): on the shared 2-core box, spinning threads of a 2-thread torch waited for descheduled partners and
    a tiny-recipe step took 3.96 s instead of 0.25 s (load 4.5; with one core kept busy by another process 0.58 s
    instead of 0.38 s). On an idle CPU spinning is faster (0.151 s vs 0.173 s a step), so it is kept there. Until
    2026-12-05 the rule read the 1-minute load average, which still counted ``make demo``'s finished pip install:
    the demo then trained passive on an idle box, its probe read 1.4x and it cut a third of its steps.
    """
    import os
    import sys

    if "torch" not in sys.modules and int(threads or 0) != 1 and "OMP_WAIT_POLICY" not in os.environ \
            and busy_cores() >= 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    torch.set_flush_denormal(True)
    # MONAI 1.6 warns on every data-module import (also in each DataLoader worker) that its nvImageCodec pydicom
    # plugin is unavailable when pydicom (the `dicom` extra) is installed without nvImageCodec; training reads NIfTI
    import logging

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


LOSSES = ("DiceFocal", "DiceCE")
#: ``train`` settings the ``stage2`` section may set for stage 2 alone (its ``init_from_stage1`` and
#: ``snapshot_epochs`` are read where they act): stage 2 starting from the stage-1 weights may want a gentler
#: learning rate than a network starting from scratch
STAGE2_TRAIN_KEYS = ("epochs", "lr", "warmup_epochs")


def class_weights(eff: dict[str, Any]) -> Any:
    """``train.class_weights``: one weight per output class (background first) for the loss's cross-entropy/focal
    and Dice terms (MONAI ``weight``), or None (all 1, the paper's)."""
    import torch

    w = eff["train"].get("class_weights")
    if w is None:
        return None
    n = int(eff["network"]["out_channels"])
    if len(w) != n or any(float(v) <= 0 for v in w):
        raise ValueError(f"train.class_weights must be {n} positive numbers, one per output class, not {w!r}")
    return torch.tensor([float(v) for v in w], dtype=torch.float32)


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
        base = cls(to_onehot_y=True, softmax=True, batch=batch, weight=class_weights(eff))
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


def cuda_amp(device: Any, eff: dict[str, Any]) -> bool:
    """Whether training on ``device`` uses the paper's fp16 AMP (``train.amp``, CUDA only; its gradient scaler too)."""
    return device.type == "cuda" and bool(eff["train"].get("amp"))


def autocast(device: Any, eff: dict[str, Any]) -> Any:
    """The forward pass's mixed precision: on CUDA fp16 autocast as :func:`cuda_amp` says, on the CPU bf16 autocast
    when ``train.cpu_bf16`` (not in the paper; off by default), else none. The loss is computed in fp32 either way."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", enabled=cuda_amp(device, eff))
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=device.type == "cpu" and bool(eff["train"].get("cpu_bf16")))


def train_steps(net: Any, batches: Iterator[Any], loss_fn: Any, opt: Any, sched: Any, scaler: Any, device: Any,
                steps: int, eff: dict[str, Any], grad_clip: float | None = None) -> float:
    """Run ``steps`` optimisation steps; returns the mean loss. Mixed precision as :func:`autocast` says for
    ``eff``; ``grad_clip``: the largest global gradient norm (``torch.nn.utils.clip_grad_norm_`` on the unscaled
    gradients; None: no clipping, the paper's recipe)."""
    import torch

    net.train()
    total = 0.0
    for _ in range(steps):
        batch = next(batches)
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True).float()
        with autocast(device, eff):
            out: Any = net(x)
        outs = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        loss = loss_fn(outs, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), float(grad_clip))
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
    with torch.no_grad(), autocast(device, eff):
        out: Any = sliding_window_inference(x.to(device), roi_size=infer_roi(eff),
                                       sw_batch_size=int(val.get("sw_batch_size", 1)), predictor=net,
                                       overlap=float(val.get("overlap", 0.0)), mode=val.get("mode", "constant"),
                                       device=torch.device("cpu"))
    return out.float()


def _probabilities_(logits: Any) -> Any:
    """Softmax over classes (sigmoid for one channel), in place: no second volume-sized copy."""
    if logits.shape[0] == 1:
        return logits.sigmoid_()
    logits.sub_(logits.max(0, keepdim=True).values).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


#: host memory for one z-slab of one network's logits in :func:`segment` (``validation.slab_mb`` overrides)
SLAB_MB = 512.0


def z_slabs(shape: tuple[int, ...], channels: int, roi_z: int, slab_mb: float = SLAB_MB) -> list[tuple[int, int, int, int]]:
    """Split the z axis of a (X, Y, Z) volume into slabs whose logits (``channels`` float32, plus half a roi of
    context on each side) fit in ``slab_mb``: ``(z0, z1, c0, c1)`` = kept part and predicted part (with context).
    One slab (the whole volume) when it fits."""
    x, y, z = (int(v) for v in shape[-3:])
    per_slice = max(1, channels * x * y * 4)
    margin = roi_z // 2
    fit = int(slab_mb * 2**20 // per_slice)
    if fit >= z:
        return [(0, z, 0, z)]
    keep = max(roi_z, (fit - 2 * margin) // roi_z * roi_z)
    out = []
    for z0 in range(0, z, keep):
        z1 = min(z, z0 + keep)
        out.append((z0, z1, max(0, z0 - margin), min(z, z1 + margin)))
    return out


def segment(nets: list[Any], image: Any, eff: dict[str, Any], device: Any) -> np.ndarray:
    """Ensemble prediction (mean softmax or mean sigmoid) -> class map (X, Y, Z) uint8.

    Streams along z: each slab (:func:`z_slabs`, half a roi of context on each side, dropped after prediction) is
    predicted by every network, accumulated and turned into labels before the next, so host memory depends on the
    slab, not on the case's length (a 314x314x876 case at 1.5 mm held 4.5 GB of logits per network before). A
    single network's argmax needs no softmax."""
    import torch

    img = torch.as_tensor(image)
    channels = int(eff["network"]["out_channels"])
    slab_mb = float(eff.get("validation", {}).get("slab_mb", SLAB_MB))
    out = np.empty(tuple(img.shape[-3:]), np.uint8)
    for z0, z1, c0, c1 in z_slabs(tuple(img.shape), channels, infer_roi(eff)[2], slab_mb):
        acc = None
        for net in nets:
            logits = predict_logits(net, img[..., c0:c1], eff, device)[0][..., z0 - c0:z1 - c0]
            if len(nets) > 1 or logits.shape[0] == 1:
                logits = _probabilities_(logits.contiguous())
            acc = logits if acc is None else acc.add_(logits)
            del logits
        assert acc is not None
        if acc.shape[0] == 1:
            out[..., z0:z1] = (acc[0] > (0.5 * len(nets) if len(nets) > 1 else 0.5)).numpy()
        else:
            out[..., z0:z1] = acc.argmax(0).numpy()
        del acc
    return out


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


def summarise_dice(per_case: list[dict[int, float]], classes: list[int]) -> dict[str, Any]:
    """Mean Dice per class over the cases that have it, and the mean over classes."""
    per_class = {}
    for c in classes:
        vals = [d[c] for d in per_case if c in d]
        if vals:
            per_class[c] = float(np.mean(vals))
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"mean": mean, "per_class": per_class, "cases": len(per_case)}


def eval_classes(eff: dict[str, Any]) -> list[int]:
    """Classes scored: the organ union for the locator; FLARE ids 1..14 (left/right split, Table 4's rows) else."""
    return [1] if eff.get("labels") == "organ-union" else list(range(1, L.NUM_FLARE_IDS))


def class_name(eff: dict[str, Any], c: int) -> str:
    return "organs" if eff.get("labels") == "organ-union" else L.name_of(c)


def score_case(nets: list[Any], item: dict[str, Any], eff: dict[str, Any], device: Any) -> dict[int, float]:
    """Dice of one preprocessed case whose label is in FLARE ids (organ union for the locator): the merged
    prediction is mapped to FLARE ids and its kidneys/adrenals split into left and right in world coordinates
    (``flare.runtime.ops.lr_split``) before scoring."""
    pred = segment(nets, item["image"], eff, device)
    truth = np.asarray(item["label"])[0]
    if eff.get("labels") != "organ-union":
        from flare.runtime.ops.lr_split import split_left_right

        pred = split_left_right(L.merged_to_flare(pred), np.asarray(item["affine"], dtype=np.float64))
    return dice_per_class(pred, truth, eval_classes(eff))


def evaluate(nets: list[Any], ds: Any, eff: dict[str, Any], device: Any, dist: Dist | None = None) -> dict[str, Any]:
    """Ensemble Dice over a dataset of whole cases (:func:`flare.train.data.eval_dataset`), sharded over ranks:
    each rank scores every ``world``-th case, one case in memory at a time, and all ranks get the reduced result."""
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    mine = [score_case(nets, ds[i], eff, device) for i in range(rank, len(ds), world)]
    per_case = gather(mine, dist) if dist else mine
    return {**summarise_dice(per_case, eval_classes(eff)), "cases_here": len(mine)}


def _loader(ds: Any, eff: dict[str, Any], seed: int, d: Dist):
    """MONAI DataLoader (its ``worker_init_fn`` seeds every worker's transforms differently from the loader's
    generator) over a ``DistributedSampler`` when distributed; the generator is seeded per rank."""
    import torch
    from monai.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    tr = eff["train"]
    workers = int(tr.get("num_workers", 0))
    sampler: DistributedSampler[Any] | None = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed) \
        if d.world > 1 else None
    extra = {"prefetch_factor": int(tr.get("prefetch", 2)), "persistent_workers": True} if workers else {}
    loader = DataLoader(ds, batch_size=int(tr.get("batch_size", 1)), shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, generator=torch.Generator().manual_seed(seed + 7919 * d.rank), **extra)
    return loader, sampler


def _cycle(loader: Any, sampler: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class Metrics:
    """TensorBoard scalars (``SummaryWriter``) on the main rank; a no-op elsewhere or when disabled."""

    def __init__(self, folder: Path | None, log: RunLog | None = None) -> None:
        self.writer = None
        if folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard comes with the train extra; without it only the text log is written
                if log:
                    log("tensorboard is not installed (pip install tensorboard): metrics go to train.log only")
                return
            self.writer = SummaryWriter(str(folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


DONE = "done.json"


def finished(folder: str | Path) -> dict[str, Any] | None:
    """The result of a completed ``fit`` in ``folder`` (its ``done.json``), else None."""
    import json

    path = Path(folder) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def fit(cfg: dict[str, Any], role: str, train_entries: list[dict[str, Any]], val_entries: list[dict[str, Any]],
        out_folder: str | Path, *, fold: int | None = None, stage: int | None = None,
        init_state: dict[str, Any] | None = None, resume: bool = False, log: RunLog | None = None,
        dist: Dist | None = None, cache_dir: str | Path | None = None, tensorboard: str | Path | None = None,
        train_label_key: str = "label") -> dict[str, Any]:
    """Train one model (``role`` "fold" or "locator") on datalist entries; best model -> ``out_folder/model.pt``.

    Training reads ``train_label_key`` of each entry through :func:`flare.train.data.train_dataset` (cached under
    ``cache_dir`` with ``data.cache: disk``); validation scores every entry's original label (``label_given`` of
    a pseudo-labelled case, else ``label``), sharded over ranks. ``out_folder/last.pt`` holds the latest state for
    ``resume``; ``out_folder/done.json`` marks a finished run. Scalars go to TensorBoard under ``tensorboard``.
    Returns ``{"best_metric", "best_epoch", "epochs", "losses", "seconds", "val_per_class", "net"}``.
    """
    import json

    import torch
    from flare.runtime.foundation.atomic import write_text_atomic

    from .checkpoints import load_checkpoint, save_checkpoint
    from .data import data_config, eval_dataset, train_dataset, warm_cache
    from .datalist import original_label
    from .distributed import setup
    from .networks import build_network

    log = log or RunLog(quiet=True)
    d = dist or setup()
    eff = role_config(cfg, role)
    stage2 = cfg.get("stage2", {}) if (role == "fold" and stage == 2) else {}
    eff = {**eff, "train": {**eff["train"], **{k: stage2[k] for k in STAGE2_TRAIN_KEYS if k in stage2}}}
    tr = eff["train"]
    epochs = int(tr["epochs"])
    out_folder = Path(out_folder)
    ck_cfg = checkpoint_config(cfg, role, fold, stage)
    seed = int(tr.get("seed", 0)) + 1000 * (stage or 0) + (fold or 0)
    torch.manual_seed(seed)
    net = build_network(eff["network"]).to(d.device)
    if init_state is not None:
        try:
            net.load_state_dict(init_state)
        except RuntimeError as exc:
            raise InputError(out_folder, f"the initial weights do not fit this config's network "
                                         f"({str(exc).splitlines()[0][:160]})") from None
    if not train_entries:
        raise InputError(out_folder, f"no training cases for {role} fold {fold} stage {stage} (the datalist's "
                                     "folds and labels leave it empty)")
    train_ds = train_dataset(train_entries, eff, cache_dir, train_label_key)
    val_entries = [{"image": e["image"], "label": original_label(e)} for e in val_entries if original_label(e)]
    cap = eff.get("validation", {}).get("max_cases")
    if cap and len(val_entries) > int(cap):  # evenly spaced subset, the same every time
        val_entries = [val_entries[int(i)] for i in np.linspace(0, len(val_entries) - 1, int(cap)).round()]
    val_ds = eval_dataset(val_entries, eff, cache_dir)
    prep = int(data_config(eff)["prep_workers"])
    t = log.elapsed()
    n_new = warm_cache(train_ds, list(range(d.rank, len(train_ds), d.world)), prep)
    n_new += warm_cache(val_ds, list(range(d.rank, len(val_ds), d.world)), prep)
    barrier(d)
    if n_new:
        log(f"{out_folder.name}: preprocessed {n_new} cases into the cache ({log.elapsed() - t:.1f} s)")
    per_rank = -(-len(train_ds) // d.world)
    steps = int(tr.get("steps_per_epoch") or max(1, per_rank // int(tr.get("batch_size", 1))))
    opt, sched = make_optimizer(net, eff, epochs * steps, int(tr.get("warmup_epochs", 0)) * steps)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda_amp(d.device, eff))
    start, best, best_epoch, losses, best_per_class, val_here = 0, -math.inf, -1, [], {}, 0
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
    loader, sampler = _loader(train_ds, eff, seed, d)
    batches = _cycle(loader, sampler)
    metrics = Metrics(Path(tensorboard) if tensorboard and d.main and tr.get("tensorboard", True) else None, log)
    t0 = log.elapsed()
    val_every = int(tr.get("val_every", 1))
    snapshots = {int(e) for e in stage2.get("snapshot_epochs", tr.get("snapshot_epochs")) or []}
    for epoch in range(start, epochs):
        losses.append(train_steps(model, batches, loss_fn, opt, sched, scaler, d.device, steps, eff,
                                  tr.get("grad_clip")))
        scalars = {"train/loss": losses[-1], "train/lr": float(sched.get_last_lr()[0])}
        msg = f"{out_folder.name} epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}"
        is_val = len(val_ds) > 0 and ((epoch + 1) % val_every == 0 or epoch == epochs - 1)
        improved = False
        if is_val:
            res = evaluate([unwrap(model)], val_ds, eff, d.device, d)
            val_here = res["cases_here"]
            names = {class_name(eff, c): round(v, 4) for c, v in res["per_class"].items()}
            msg += f" val dice {res['mean']:.4f} ({res['cases']} cases: " + \
                ", ".join(f"{k} {v:.3f}" for k, v in names.items()) + ")"
            scalars["val/mean_dice"] = res["mean"]
            scalars.update({f"val_dice/{k}": v for k, v in names.items()})
            if res["mean"] > best:
                best, best_epoch, best_per_class, improved = res["mean"], epoch, names, True
        if d.main:
            if improved or (not len(val_ds) and epoch == epochs - 1):
                best_epoch = epoch if not len(val_ds) else best_epoch
                save_checkpoint(out_folder, unwrap(model), ck_cfg, epoch=epoch, best_metric=best)
            save_checkpoint(out_folder, unwrap(model), ck_cfg, epoch=epoch, best_metric=best, filename="last.pt",
                            extra={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "best_epoch": best_epoch, "losses": losses})
            if epoch + 1 in snapshots:  # weights for a learning curve: OUT/foldK/snapshots/stepNNNNN/model.pt
                save_checkpoint(out_folder / "snapshots" / f"step{(epoch + 1) * steps:06d}", unwrap(model), ck_cfg,
                                epoch=epoch)
            metrics.scalars(scalars, (epoch + 1) * steps)
            log(msg)
        barrier(d)
    metrics.close()
    result = {"best_metric": best if best > -math.inf else float("nan"), "best_epoch": best_epoch + 1,
              "epochs": epochs, "losses": losses, "seconds": log.elapsed() - t0, "val_per_class": best_per_class,
              "train_cases": len(train_ds), "val_cases": len(val_ds), "ranks": d.world}
    here = {"val_cases_this_rank": val_here, "sampler": type(sampler).__name__ if sampler is not None else None}
    if d.main:
        write_text_atomic(out_folder / DONE, json.dumps(result, indent=1) + "\n")
    barrier(d)
    return {**result, **here, "net": unwrap(model)}
