"""The re-biased tiny bundle shared by the parity, report and GPU tests (a helper module, not a test file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from conftest import _export_onnx, data_path


def _calibration_input(spacing: float) -> torch.Tensor:
    """The abdomen CT in RAS at ``spacing`` mm, HU-windowed, padded to multiples of 16, as (1, 1, X, Y, Z)."""
    from flare.benchmarks.reference import read_canonical
    from monai.transforms import DivisiblePad, Resize, ScaleIntensityRange

    image = read_canonical(data_path("ts_abdomen_ct_3mm.nii.gz")).image
    shape = [max(1, round(n * 3.0 / spacing)) for n in image.shape[1:]]
    x = ScaleIntensityRange(-250, 250, 0.0, 1.0, clip=True)(Resize(shape, mode="trilinear")(image))
    return DivisiblePad(16)(x).as_tensor()[None].float()


def _recalibrate(src: Path, dst: Path) -> None:
    """Copy the tiny checkpoints and re-bias their final convs on a real CT.

    Folds: weights x10 and each class's mean logit subtracted, so that many classes win somewhere with clear
    margins. Locator: sign and bias set so that soft tissue is foreground and air is not (a real crop box).
    """
    import torch
    from flare.train.checkpoints import load_network, save_checkpoint

    shutil.copytree(src, dst)
    for folder in sorted(p for p in dst.iterdir() if (p / "model.pt").is_file()):
        net, cfg = load_network(folder)
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        x = _calibration_input(float(cfg["spacing_mm"][0]))
        with torch.no_grad():
            if cfg["role"] == "locator":  # foreground where the logit departs from its value in air
                logits = net(x)[0, 0]
                air = float(logits[x[0, 0] == 0].median())
                body = float(logits[x[0, 0] > 0.3].median())
                sign = 1.0 if body > air else -1.0
                last.weight.mul_(sign)
                last.bias.mul_(sign)
                last.bias.sub_(sign * (air + body) / 2.0)
            else:
                last.weight.mul_(10.0)
                last.bias.mul_(10.0)
                last.bias.sub_(net(x).mean(dim=(0, 2, 3, 4)))
        save_checkpoint(folder, net, cfg)


def _divisor(folder: Path) -> int:
    """The checkpoint's network's spatial divisor, as flare-export writes it."""
    from flare.train.networks import spatial_divisor

    return spatial_divisor(json.loads((folder / "config.json").read_text())["network"])


def build_parity_bundle(tiny_checkpoints: Path, root: Path, roi: tuple[int, int, int] = (32, 32, 32)) -> Path:
    """A bundle (fp32 ONNX) and its checkpoint folder with re-biased tiny nets under ``root`` (reused if there);
    each model declares its network's true spatial divisor (locator 8, folds 16 or 8)."""
    from flare.runtime.bundle.manifest import model_entry, new_bundle_json, write_bundle_json

    ckpt, bundle = root / "ckpt", root / "bundle"
    if (bundle / "bundle.json").is_file():
        return bundle
    data_path("ts_abdomen_ct_3mm.nii.gz")  # the calibration CT: skip before anything is written
    shutil.rmtree(root, ignore_errors=True)  # what an earlier, failed build left
    _recalibrate(tiny_checkpoints, ckpt)
    bundle.mkdir(parents=True)
    loc = model_entry("locator", {"fp32": _export_onnx(ckpt / "locator", bundle / "locator.fp32.onnx")}, out_channels=1,
                      spatial_divisor=_divisor(ckpt / "locator"))
    folds = [model_entry(f"fold{k}", {"fp32": _export_onnx(ckpt / f"fold{k}", bundle / f"fold{k}.fp32.onnx")},
                         out_channels=13, spatial_divisor=_divisor(ckpt / f"fold{k}")) for k in (0, 1)]
    # coarser than the tiny bundle (6 mm, 32^3 tiles) to keep the tests fast; the nets are fully convolutional
    doc = new_bundle_json(folds, loc, spacing_mm=(6.0, 6.0, 6.0), locator_spacing_mm=(8.0, 8.0, 8.0),
                          roi=roi, locator_roi=(32, 32, 32), provenance={"checkpoint_dir": str(ckpt)})
    write_bundle_json(bundle, doc)
    return bundle


def fold_major(volume: Any, engine: Any, roi: tuple[int, int, int], out: Any, *, overlap: float = 0.0,
               blend: str = "constant") -> Any:
    """The classic fold-major oracle: one model over ``volume`` (host), its blended tile outputs ADDED to ``out``
    (C, X, Y, Z float32), by the runtime's own tiling (``tiled_labels`` with ``out`` as the kept accumulator)."""
    import numpy as np
    from flare.runtime.inference.ensemble import tiled_labels

    _, plan, _ = tiled_labels(volume, [engine.run], roi, np, channels=out.shape[0], overlap=overlap, blend=blend,
                              base=out, keep_all=True)
    return plan
