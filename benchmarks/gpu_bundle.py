"""The GPU check's benchmark bundles: random-weight fold networks of the paper's size (timing and memory only) with
a locator that crops like a trained one, and the whole-volume worst case beside it.

Random weights alone measure a case no user has: a random locator keeps the whole image (no crop), random folds
label random blobs everywhere (no z-crop; post-processing on blobs took 3.5-4 s on the H200 against 0.24 s on real
anatomy). So both networks get a rule baked into their ONNX graph (torch ops, exported with the network):

- **locator** (``real``): the CT at 4 mm, normalised [-250, 250] HU → [0, 1], averaged over 5³ voxels; organ-union
  logit ``20 × (mean − 0.35)``: everything denser than about −75 HU (the body without the air and the table's
  foam around it), so the x/y box plus the bundle's margin is what a trained locator gives on an abdominal CT
  (a little wider: the body wall is kept). ``worst``: logit +20 everywhere: the whole image, as before.
- **folds**: the random SegResNetDS (all of its compute runs) scaled by 1e-2 plus a rule head: liver (merged class
  1) where the 3³ mean lies in soft tissue (0.45-0.75, i.e. −25…125 HU), background elsewhere, tumor never — so
  fold 0's labels give the paper's abdominal z-range and post-processing runs on body-shaped masks.

``python -m flare.benchmarks.gpu_bundle WORK [--size flare23|tiny]`` writes ``WORK/ckpt`` (checkpoints of the raw
networks, for the MONAI reference), ``WORK/bundle`` (realistic), ``WORK/bundle-worst`` (hard links to the same
fold files, the keep-all locator) and the synthetic 512×512×300 case ``WORK/cases/flare_n300.nii.gz``. ``tiny``
(8 filters, 3 mm, 64³ tiles) is for CPU dry runs and tests; ``flare23`` is the paper's network (87 M parameters)
at 1 mm with 224³ tiles; ``cpu`` is ``train/configs/cpu.json``'s (16 filters, 3 mm, 128³ tiles, profile ``cpu``)
with int8 models beside fp32 (calibrated on two shared CTs, no accuracy gate) for the CPU profile's timings. Folds 1-4 are copies of fold 0's files: five sessions, five runs per tile.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    "flare23": {"filters": 32, "blocks": [1, 2, 2, 4, 4], "spacing": [1.0, 1.0, 1.0], "roi": [224, 224, 224],
                "locator_filters": 16},
    "tiny": {"filters": 8, "blocks": [1, 1, 1, 1, 1], "spacing": [3.0, 3.0, 3.0], "roi": [64, 64, 64],
             "locator_filters": 8},
    # train/configs/cpu.json's network: fp32 and int8 (calibrated on the shared CTs, no gate: random weights)
    "cpu": {"filters": 16, "blocks": [1, 2, 2, 4], "spacing": [3.0, 3.0, 3.0], "roi": [128, 128, 128],
            "locator_filters": 8, "int8": True},
}
#: the CTs the ``cpu`` size's int8 models are calibrated on (from ``../shared/data``)
CALIBRATION_CTS = ("ts_body_ct_3mm_int32.nii.gz", "ts_torso_ct_1p5mm_lps.nii.gz")
LOCATOR_THRESHOLD = 0.35  # normalised [-250, 250] HU: -75 HU
TISSUE = (0.45, 0.75)  # -25 ... 125 HU
N_FOLDS = 5


def _rule_modules() -> tuple[type, type]:
    import torch
    import torch.nn.functional as F

    class RuleLocator(torch.nn.Module):
        """Organ-union logit from a smoothed density threshold (or +20 everywhere: ``keep_all``)."""

        def __init__(self, keep_all: bool = False) -> None:
            super().__init__()
            self.keep_all = keep_all

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.keep_all:
                return x * 0.0 + 20.0
            return 20.0 * (F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False) - LOCATOR_THRESHOLD)

    class RuleFold(torch.nn.Module):
        """``net(x) × 1e-2`` plus liver where the smoothed density is soft tissue, background elsewhere."""

        def __init__(self, net: torch.nn.Module, channels: int) -> None:
            super().__init__()
            self.net, self.channels = net, channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
            tissue = torch.sigmoid((m - TISSUE[0]) * 40.0) * torch.sigmoid((TISSUE[1] - m) * 40.0)
            rule = torch.cat([8.0 * (1.0 - tissue), 8.0 * tissue, torch.zeros_like(x).expand(-1, self.channels - 2,
                                                                                             -1, -1, -1)], dim=1)
            return self.net(x) * 0.01 + rule

    return RuleLocator, RuleFold


def save_checkpoints(ckpt: Path, size: str) -> None:
    """Random-weight checkpoints of fold 0 (copied to folds 1-4) and the locator, flare-train layout."""
    import torch
    from flare.train.checkpoints import save_checkpoint
    from flare.train.networks import FLARE23_NETWORK, LOCATOR_NETWORK, build_network

    s = SIZES[size]
    base = {"stage": 2, "spacing_mm": s["spacing"], "hu_window": [-250.0, 250.0], "roi": s["roi"],
            "labels": "flare23-merged13"}
    fold_net = {**FLARE23_NETWORK, "init_filters": s["filters"], "blocks_down": s["blocks"]}
    loc_net = {**LOCATOR_NETWORK, "init_filters": s["locator_filters"]}
    torch.manual_seed(0)
    save_checkpoint(ckpt / "fold0", build_network(fold_net).eval(), {**base, "network": fold_net, "role": "fold",
                                                                    "fold": 0})
    for k in range(1, N_FOLDS):
        shutil.copytree(ckpt / "fold0", ckpt / f"fold{k}", dirs_exist_ok=True)
    torch.manual_seed(99)
    save_checkpoint(ckpt / "locator", build_network(loc_net).eval(),
                    {**base, "network": loc_net, "role": "locator", "fold": None, "spacing_mm": [4.0, 4.0, 4.0],
                     "roi": [128, 128, 128], "labels": "organ-union", "locator_margin_mm": 20.0})


def _copy_fold0(bundle: Path, doc: dict[str, Any]) -> None:
    """Folds 1-4 as hard links (copies where links fail) of fold 0's files."""
    fold0 = doc["folds"][0]
    doc["folds"] = [fold0]
    for k in range(1, N_FOLDS):
        entry = json.loads(json.dumps(fold0))
        entry["name"] = f"fold{k}"
        for f in entry["files"].values():
            new = f["path"].replace("fold0", f"fold{k}")
            _link(bundle / f["path"], bundle / new)
            f["path"] = new
        doc["folds"].append(entry)


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_bundles(work: Path, size: str = "flare23") -> dict[str, Path]:
    """``WORK/ckpt``, ``WORK/bundle`` (rule locator) and ``WORK/bundle-worst`` (keep-all locator); see the module
    docstring. Returns the three paths."""
    from flare.export.bundle_export import export_model, export_sources
    from flare.export.sources import flare_sources
    from flare.runtime.bundle.manifest import write_bundle_json

    RuleLocator, RuleFold = _rule_modules()
    ckpt, real, worst = work / "ckpt", work / "bundle", work / "bundle-worst"
    save_checkpoints(ckpt, size)
    for k in range(1, N_FOLDS):  # export fold 0 only; folds 1-4 are links to its files
        shutil.move(str(ckpt / f"fold{k}"), str(work / f".fold{k}"))
    try:
        src = flare_sources(ckpt)
    finally:
        for k in range(1, N_FOLDS):
            shutil.move(str(work / f".fold{k}"), str(ckpt / f"fold{k}"))
    assert src.locator is not None
    src.folds[0].net = RuleFold(src.folds[0].net, src.folds[0].out_channels).eval()
    src.locator.net = RuleLocator().eval()
    src.notes.append("benchmark bundle (flare.benchmarks.gpu_bundle): random weights plus rule heads; timing only")
    calibration = None
    if SIZES[size].get("int8"):  # the CPU profile: int8 beside fp32, no fp16
        from .cases import shared_data_dir

        calibration, src.profile = [shared_data_dir() / n for n in CALIBRATION_CTS], "cpu"
    export_sources(src, real, fp16=calibration is None, verify=False, progress=False, calibration=calibration,
                   command=f"gpu_bundle {work} --size {size}")
    doc = json.loads((real / "bundle.json").read_text())
    _copy_fold0(real, doc)
    write_bundle_json(real, doc)
    # the worst case: same fold files (links), a locator that keeps the whole image
    if worst.exists():
        shutil.rmtree(worst)
    worst.mkdir()
    for f in real.iterdir():
        if f.suffix == ".onnx" and not f.name.startswith("locator"):
            _link(f, worst / f.name)
    src.locator.net = RuleLocator(keep_all=True).eval()
    doc["locator"], _ = export_model(src.locator, worst, True, 17, lambda _s: None)
    doc["provenance"]["notes"] = doc["provenance"].get("notes", []) + ["worst case: the locator keeps the whole image"]
    write_bundle_json(worst, doc)
    return {"ckpt": ckpt, "bundle": real, "bundle-worst": worst}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m flare.benchmarks.gpu_bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="flare23")
    p.add_argument("--case", default="flare_n300", help="synthetic case to build into WORK/cases (see cases.py); "
                                                         "'none': no case")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    built = not (a.work / "bundle-worst" / "bundle.json").is_file()
    if built:  # a bundle already there (built beforehand for a dry run without torch) is kept
        import torch  # noqa: F401  (before onnxruntime: on the GPU machine torch brings the CUDA libraries)

        build_bundles(a.work, a.size)
    case = None if a.case == "none" else a.work / "cases" / f"{a.case}.nii.gz"
    if case is not None and not case.is_file():
        from .cases import SYNTHETIC, build_case

        build_case(next(c for c in SYNTHETIC if c.name == a.case), case)
    print(json.dumps({"stage": "bundle", "size": a.size, "built": built, "work": str(a.work), "case": str(case),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
