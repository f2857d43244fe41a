"""Pseudo-label merging: given labels are never overwritten, tumour is never added, only missing organs are."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.errors import InputError
from flare.runtime.ops.lr_split import split_left_right
from flare.train.config import load_config, role_config
from flare.train.data import preprocess
from flare.train.datalist import load_datalist
from flare.train.networks import build_network
from flare.train.phantoms import make_phantoms
from flare.train.pseudolabel import merge_pseudo_labels, pseudolabel_datalist, to_original_grid


def test_merge_rules_on_random_maps(rng: np.random.Generator) -> None:
    for _ in range(20):
        keep = rng.choice(np.arange(1, 15), size=rng.integers(0, 8), replace=False)
        given = rng.integers(0, 15, (20, 20, 20)).astype(np.uint8)
        given[~np.isin(given, keep)] = 0
        pseudo = rng.integers(0, 15, (20, 20, 20)).astype(np.uint8)
        out = merge_pseudo_labels(given, pseudo)
        assert np.array_equal(out[given > 0], given[given > 0])  # never overwritten
        added = out != given
        assert not np.any(out[added] == L.TUMOR)  # tumour never pseudo-labelled
        assert not np.isin(out[added], keep).any()  # only classes the case lacks
        missing = [i for i in L.ORGAN_IDS if i not in keep]
        expect = (given == 0) & np.isin(pseudo, missing)
        assert np.array_equal(added, expect)


def test_split_sides_and_regrid() -> None:
    flare = np.zeros((20, 10, 10), np.uint8)
    flare[9:11, 4:6, :] = L.AORTA
    flare[14:17, 3:6, 3:6] = L.RIGHT_KIDNEY  # larger x = patient right (RAS)
    flare[2:5, 3:6, 3:6] = L.RIGHT_KIDNEY
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    out = split_left_right(flare, aff)
    assert set(np.unique(out[14:17])) == {0, L.RIGHT_KIDNEY} and L.LEFT_KIDNEY in out[2:5]
    assert np.array_equal(to_original_grid(out, aff, out.shape, aff), out)
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = -0.5  # a 1 mm grid covering the same field of view
    up = to_original_grid(out, aff, (40, 20, 20), fine)
    assert np.array_equal(up[::2, ::2, ::2], out)


def test_pseudolabel_files_keep_given_labels(tmp_path: Path) -> None:
    make_phantoms(tmp_path / "ph", 6, seed=5, size=48, holdout=0)
    doc = load_datalist(tmp_path / "ph")
    small = {"spacing_mm": [8.0, 8.0, 8.0], "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 1}}
    eff = role_config(load_config("tiny", small), "fold")
    torch.manual_seed(0)
    nets = [build_network(eff["network"]).eval()]  # random net: predicts all sorts of classes
    new = pseudolabel_datalist(nets, doc["training"], eff, torch.device("cpu"), tmp_path / "pl")
    assert len(new) == len(doc["training"]) >= 3  # the unlabelled phantoms (no label file) are left out
    n_done = 0
    for old, entry in zip(doc["training"], new, strict=True):
        if "label_given" not in entry:
            continue
        n_done += 1
        given_img = nib.load(old["label"])
        given = np.asarray(given_img.dataobj)
        out_img = nib.load(entry["label"])
        out = np.asarray(out_img.dataobj)
        assert out.shape == given.shape and np.allclose(out_img.affine, given_img.affine)
        assert np.array_equal(out[given > 0], given[given > 0])
        assert not np.any((out == L.TUMOR) & (given != L.TUMOR))
        assert set(np.unique(out[out != given])) <= set(L.ORGAN_IDS) - set(np.unique(given))
    assert n_done >= 1
    items = preprocess(new, eff)  # stage-2 labels load through the training pipeline
    assert all(int(item["label"].max()) < L.NUM_MERGED_CLASSES for item in items)


def test_split_sides_survives_degenerate_components() -> None:
    """A 1x1x3 kidney mask [1, 0, 1] makes connected-components-3d 4.1.1 raise; the split still happens."""
    flare = np.zeros((1, 1, 3), np.uint8)
    flare[0, 0, [0, 2]] = L.RIGHT_KIDNEY
    aff = np.eye(4)
    aff[0, 3] = -1.0
    out = split_left_right(flare, aff)
    assert out.shape == flare.shape and set(np.unique(out)) <= {0, L.RIGHT_KIDNEY, L.LEFT_KIDNEY}


def _liver_case(folder: Path) -> dict[str, str]:
    """A 16x16x40 CT at 8 mm (RAS): a large bright block low in z ("abdomen") and a slender bright column high in z
    ("head"), longer in z than the block; the given label holds only a spleen, so liver is missing."""
    ct = np.full((16, 16, 40), -100.0, np.float32)
    ct[2:10, 2:10, 2:8] = 200.0   # 384 voxels over 6 slices
    ct[12:14, 12:14, 20:34] = 200.0  # 56 voxels over 14 slices, 96 mm above the block
    given = np.zeros(ct.shape, np.uint8)
    given[12:15, 2:5, 4:7] = L.SPLEEN
    aff = np.diag([8.0, 8.0, 8.0, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct, aff), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(given, aff), folder / "given.nii.gz")
    return {"image": str(folder / "ct.nii.gz"), "label": str(folder / "given.nii.gz")}


def _bright_is_liver() -> torch.nn.Module:
    """A real 1x1x1 convolution whose argmax is liver where the normalised HU is above 0.6 (50 HU), else background."""
    net = torch.nn.Conv3d(1, L.NUM_MERGED_CLASSES, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.fill_(-1000.0)
        net.bias[0] = 0.0
        net.weight[1] = 100.0  # merged class 1 = liver
        net.bias[1] = -60.0
    return net.eval()


@pytest.mark.parametrize("mode", ["none", "paper", "strict"])
def test_pseudolabel_postprocess_modes(tmp_path: Path, mode: str) -> None:
    """``pseudolabel.postprocess``: none keeps a remote false liver, the paper's z-run rule keeps it *instead of*
    the true one (its run is longer), strict keeps the largest 3-D component; the given labels stay."""
    entry = _liver_case(tmp_path / "case")
    over = {"spacing_mm": [8.0, 8.0, 8.0], "roi": [16, 16, 16], "pseudolabel": {"postprocess": mode}}
    eff = role_config(load_config("tiny", over), "fold")
    new = pseudolabel_datalist([_bright_is_liver()], [entry], eff, torch.device("cpu"), tmp_path / "pl")
    out = np.asarray(nib.load(new[0]["label"]).dataobj)
    block, column = out[2:10, 2:10, 2:8] == L.LIVER, out[12:14, 12:14, 20:34] == L.LIVER
    assert int(np.sum(out == L.SPLEEN)) == 27
    expect = {"none": (True, True), "paper": (False, True), "strict": (True, False)}[mode]
    assert (bool(block.all()), bool(column.all())) == expect  # whole or (count below) not at all
    assert int(np.sum(out == L.LIVER)) == 384 * expect[0] + 56 * expect[1]


def test_pseudolabel_postprocess_rejects_unknown_mode(tmp_path: Path) -> None:
    """A bad value stops the config from loading, before any training."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**load_config("tiny"), "pseudolabel": {"postprocess": "largest"}}))
    with pytest.raises(InputError, match="pseudolabel.postprocess must be one of none, paper, strict, got 'largest'"):
        load_config(cfg)
