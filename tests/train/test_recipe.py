"""Recipe as data: configs, the paper's network, checkpoint config fields and the weights_only round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.errors import InputError
from flare.train.checkpoints import load_checkpoint, load_network, save_checkpoint
from flare.train.config import available_configs, checkpoint_config, infer_roi, load_config, role_config
from flare.train.networks import build_network, count_parameters


def test_named_configs() -> None:
    assert {"flare23", "tiny"} <= set(available_configs())
    cfg = load_config("flare23")
    net, tr = cfg["network"], cfg["train"]
    assert net["name"] == "SegResNetDS" and net["blocks_down"] == [1, 2, 2, 4, 4] and net["init_filters"] == 32
    assert net["out_channels"] == L.NUM_MERGED_CLASSES == 13 and net["dsdepth"] > 1
    assert cfg["spacing_mm"] == [1.0, 1.0, 1.0] and cfg["roi"] == [224, 224, 224]
    assert (tr["lr"], tr["weight_decay"], tr["warmup_epochs"], tr["epochs"], tr["batch_size"]) == (2e-4, 1e-5, 3, 300, 1)
    assert tr["loss"] == "DiceFocal" and tr["amp"] is True
    loc = role_config(cfg, "locator")
    assert loc["network"]["name"] == "SegResNet" and loc["network"]["blocks_down"] == [1, 2, 2, 4]
    assert loc["network"]["init_filters"] == 16 and loc["spacing_mm"] == [4.0, 4.0, 4.0] and loc["roi"] == [128] * 3
    assert loc["labels"] == "organ-union" and loc["hu_window"] == [-250.0, 250.0]


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such config"):
        load_config("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="cannot parse"):
        load_config(bad)
    with pytest.raises(InputError, match="divisible by 8"):  # tiny: 4 levels
        load_config("tiny", {"roi": [36, 36, 36]})
    with pytest.raises(InputError, match="validation.roi sides must be divisible by 8"):
        load_config("tiny", {"validation": {"roi": [36, 36, 36]}})
    assert load_config("tiny", {"validation": {"roi": [72, 72, 72]}})["validation"]["roi"] == [72] * 3
    with pytest.raises(InputError, match="validation.roi sides must be divisible by 16"):  # flare23: 5 levels
        load_config("flare23", {"validation": {"roi": [72, 72, 72]}})
    with pytest.raises(InputError, match="locator.roi sides must be divisible by 8"):
        load_config("flare23", {"locator": {"roi": [100, 100, 100]}})


def test_inference_tile_apart_from_the_training_crop() -> None:
    """``validation.roi``: the tile of whole-case prediction and of the exported bundle (checkpoint ``roi``); the
    training crop stays ``roi``; the locator keeps its own (its section may set one) and never takes the folds'."""
    cfg = load_config("tiny", {"roi": [32, 32, 32], "validation": {"roi": [64, 64, 64]}})
    fold = role_config(cfg, "fold")
    assert fold["roi"] == [32] * 3 and infer_roi(fold) == [64] * 3
    assert checkpoint_config(cfg, "fold", 0, 1)["roi"] == [64] * 3
    loc = role_config(cfg, "locator")
    assert infer_roi(loc) == loc["roi"] == checkpoint_config(cfg, "locator", None, None)["roi"]
    cfg["locator"]["validation"] = {"roi": [96, 96, 96]}
    assert infer_roi(role_config(cfg, "locator")) == [96] * 3
    weighted = load_config("tiny", {"train": {"class_weights": [1] * 13, "crop_ratios": [1] * 15}})
    assert "class_weights" not in role_config(weighted, "locator")["train"]  # 13 classes: the folds' only
    assert "crop_ratios" not in role_config(weighted, "locator")["train"]
    plain = role_config(load_config("tiny"), "fold")
    assert infer_roi(plain) == plain["roi"]  # no validation.roi: the training crop


def test_flare23_network_size() -> None:
    """The paper's network: 87.2 M parameters with 15 outputs; 87,169,524 with the 13 merged outputs."""
    spec = load_config("flare23")["network"]
    assert count_parameters(build_network(spec)) == 87_169_524
    assert round(count_parameters(build_network({**spec, "out_channels": 15})) / 1e6, 1) == 87.2


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    cfg = load_config("tiny")
    for role, fold in (("fold", 2), ("locator", None)):
        ck = checkpoint_config(cfg, role, fold, 2 if role == "fold" else None)
        torch.manual_seed(0)
        net = build_network(ck["network"]).eval()
        folder = tmp_path / role
        save_checkpoint(folder, net, ck, epoch=3, best_metric=0.5)
        payload = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        assert payload["epoch"] == 3 and payload["config"]["role"] == role
        loaded, conf = load_network(folder)
        x = torch.rand(1, 1, 32, 32, 32)
        with torch.no_grad():
            assert torch.equal(net(x), loaded(x))
        assert json.loads((folder / "config.json").read_text()) == conf
        for key in ("network", "role", "fold", "stage", "spacing_mm", "hu_window", "roi", "labels",
                    "training_config"):
            assert key in conf
        assert conf["hu_window"] == [-250.0, 250.0]
        if role == "locator":
            assert conf["labels"] == "organ-union" and conf["network"]["out_channels"] == 1
            assert conf["locator_margin_mm"] > 0
        else:
            assert conf["labels"] == "flare23-merged13" and conf["fold"] == 2
    assert load_checkpoint(tmp_path / "fold")["best_metric"] == 0.5
