"""Shared fixtures: real CTs from ../shared/data and tiny randomly initialised models (checkpoints and a bundle)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: real CTs: $FLARE_SHARED_DATA when set (a checkout without ../shared beside it), else ../shared/data
DATA = Path(os.environ["FLARE_SHARED_DATA"]) if os.environ.get("FLARE_SHARED_DATA") else REPO.parent / "shared" / "data"

TINY_FOLD_NET = {"name": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1, 1, 1, 1], "in_channels": 1,
                 "out_channels": 13, "norm": "batch", "dsdepth": 1}
TINY4_FOLD_NET = {**TINY_FOLD_NET, "blocks_down": [1, 1, 1, 1]}  # 4 levels (the cpu recipe's depth): divisor 8
TINY_LOCATOR_NET = {"name": "SegResNet", "init_filters": 4, "blocks_down": [1, 1, 1, 1], "in_channels": 1,
                    "out_channels": 1, "norm": "batch"}
TINY_SPACING = [3.0, 3.0, 3.0]
TINY_ROI = [64, 64, 64]


def data_path(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real CT {path} not available")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return DATA


def _tiny_config(role: str, fold: int | None, net: dict) -> dict:
    cfg = {"network": net, "role": role, "fold": fold, "stage": 2, "spacing_mm": TINY_SPACING,
           "hu_window": [-250.0, 250.0], "roi": TINY_ROI,
           "labels": "organ-union" if role == "locator" else "flare23-merged13"}
    if role == "locator":
        cfg.update(spacing_mm=[6.0, 6.0, 6.0], roi=[32, 32, 32], locator_margin_mm=20.0)
    return cfg


def _randomise_batchnorm(net, seed: int) -> None:
    """Give BatchNorm layers non-trivial running statistics so that random nets produce varied outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0.0, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """CKPT_DIR with a tiny locator and 2 tiny folds in the flare.train.checkpoints layout (random weights)."""
    return _tiny_checkpoints(tmp_path_factory.mktemp("tiny_ckpt"), TINY_FOLD_NET)


@pytest.fixture(scope="session")
def tiny4_checkpoints(tmp_path_factory) -> Path:
    """As ``tiny_checkpoints`` with 4-level folds (spatial divisor 8, like the cpu recipe's network)."""
    return _tiny_checkpoints(tmp_path_factory.mktemp("tiny4_ckpt"), TINY4_FOLD_NET)


def _tiny_checkpoints(root: Path, fold_net: dict) -> Path:
    import torch
    from flare.train.checkpoints import save_checkpoint
    from flare.train.networks import build_network

    for role, fold, spec, seed in (("locator", None, TINY_LOCATOR_NET, 0), ("fold", 0, fold_net, 1),
                                   ("fold", 1, fold_net, 2)):
        torch.manual_seed(seed)
        net = build_network(spec).eval()
        _randomise_batchnorm(net, seed)
        if role == "locator":
            # bias the organ logit up so the locator finds a plausible foreground on real CTs
            last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
            if last.bias is not None:
                with torch.no_grad():
                    last.bias.fill_(0.5)
        save_checkpoint(root / ("locator" if role == "locator" else f"fold{fold}"), net, _tiny_config(role, fold, spec))
    return root


def _export_onnx(ckpt: Path, onnx_path: Path) -> dict:
    import torch
    from flare.runtime.bundle.manifest import sha256_file
    from flare.train.checkpoints import load_network

    net, _ = load_network(ckpt)
    x = torch.zeros(1, 1, 32, 32, 32)
    axes = {2: "x", 3: "y", 4: "z"}
    torch.onnx.export(net, x, str(onnx_path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": axes, "logits": axes}, opset_version=17, dynamo=False)
    return {"path": onnx_path.name, "sha256": sha256_file(onnx_path), "input_name": "image",
            "output_name": "logits", "input_dtype": "float32", "output_dtype": "float32"}


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoints: Path, tmp_path_factory) -> Path:
    """A bundle made from ``tiny_checkpoints`` with a plain torch.onnx.export (fp32)."""
    from flare.runtime.bundle.manifest import model_entry, new_bundle_json, write_bundle_json

    root = tmp_path_factory.mktemp("tiny_bundle")
    loc = model_entry("locator", {"fp32": _export_onnx(tiny_checkpoints / "locator", root / "locator.fp32.onnx")},
                      out_channels=1)
    folds = [model_entry(f"fold{k}", {"fp32": _export_onnx(tiny_checkpoints / f"fold{k}", root / f"fold{k}.fp32.onnx")},
                         out_channels=13) for k in (0, 1)]
    doc = new_bundle_json(folds, loc, spacing_mm=tuple(TINY_SPACING), locator_spacing_mm=(6.0, 6.0, 6.0),
                          roi=tuple(TINY_ROI), locator_roi=(32, 32, 32),
                          provenance={"checkpoint_dir": str(tiny_checkpoints)})
    write_bundle_json(root, doc)
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def parity_bundle(tiny_checkpoints: Path, tmp_path_factory) -> Path:
    """The re-biased bundle of parity_support, built once per session (shared by test_parity and test_bench_report)."""
    from parity_support import build_parity_bundle

    return build_parity_bundle(tiny_checkpoints, tmp_path_factory.getbasetemp() / "parity")


@pytest.fixture
def parity_bundle4(tiny4_checkpoints: Path, tmp_path_factory) -> Path:
    """The re-biased bundle of parity_support with 4-level folds (``spatial_divisor`` 8) and 64^3 tiles."""
    from parity_support import build_parity_bundle

    return build_parity_bundle(tiny4_checkpoints, tmp_path_factory.getbasetemp() / "parity4", roi=(64, 64, 64))


@pytest.fixture(scope="session")
def synthetic_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_bundle`` with a model card saying its models were trained on synthetic data."""
    root = tmp_path_factory.mktemp("synthetic") / "bundle"
    shutil.copytree(tiny_bundle, root)
    doc = json.loads((root / "bundle.json").read_text())
    doc["card"] = {"dataset": "flare-phantoms", "cases": 34, "data": "synthetic", "recipe": "tiny",
                   "trained_at": "2026-12-04"}
    (root / "bundle.json").write_text(json.dumps(doc))
    return root
