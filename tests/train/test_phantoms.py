"""Phantoms: determinism, subset semantics, orientation on disk, plausible anatomy; the datalist analysis."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flare.runtime.foundation import labels as L
from flare.train.analysis import analyze
from flare.train.phantoms import SUBSETS, keep_subset, make_case, make_phantoms


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(out, 12, seed=3, size=48, holdout=2)
    return out


def test_case_is_deterministic_and_independent_of_count(phantom_dir: Path) -> None:
    a, b = make_case(5, seed=3, size=48), make_case(5, seed=3, size=48)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label_full, b.label_full)
    assert not np.array_equal(make_case(5, seed=4, size=48).hu.shape, a.hu.shape) or \
        not np.array_equal(make_case(5, seed=4, size=48).hu, a.hu)
    # the file written in a 12-case series equals the standalone case, after reorientation to RAS
    doc = json.loads((phantom_dir / "dataset.json").read_text())
    entry = next(e for e in doc["training"] + doc["testing"] if e["params"]["index"] == 5)
    img = nib.as_closest_canonical(nib.load(phantom_dir / entry["label_full"]))
    assert np.array_equal(np.asarray(img.dataobj), a.label_full)
    assert np.allclose(img.affine, a.grid.affine)


def test_orientations_and_spacings_vary(phantom_dir: Path) -> None:
    doc = json.loads((phantom_dir / "dataset.json").read_text())
    entries = doc["training"] + doc["testing"]
    codes = {"".join(nib.aff2axcodes(nib.load(phantom_dir / e["image"]).affine)) for e in entries}
    assert len(codes) >= 3 and "RAS" in codes and "LPS" in codes
    assert len({tuple(e["params"]["spacing_mm"]) for e in entries}) == len(entries)
    assert all(nib.load(phantom_dir / e["image"]).get_data_dtype() == np.int16 for e in entries[:3])


def test_subset_semantics(phantom_dir: Path) -> None:
    doc = json.loads((phantom_dir / "dataset.json").read_text())
    assert len(doc["testing"]) == 2 and all("fold" not in e for e in doc["testing"])
    assert {e["fold"] for e in doc["training"]} <= set(range(5))
    unlabelled = [e for e in doc["training"] if e["subset"] == "unlabelled"]
    assert unlabelled and all("label" not in e and e["label_full"] for e in unlabelled)  # no label file, as FLARE's
    for e in doc["training"]:
        if e["subset"] == "unlabelled":
            continue
        given = np.asarray(nib.load(phantom_dir / e["label"]).dataobj)
        full = np.asarray(nib.load(phantom_dir / e["label_full"]).dataobj)
        assert set(np.unique(given)) - {0} <= set(SUBSETS[e["subset"]])
        assert np.array_equal(given, keep_subset(full, e["subset"]))
        keep = np.isin(full, SUBSETS[e["subset"]])
        assert np.array_equal(given[keep], full[keep])  # a given label is always the truth


def test_anatomy_is_plausible() -> None:
    case = make_case(0, seed=1, size=96, subset="all")
    lab, hu, aff = case.label_full, case.hu, case.grid.affine
    present = set(np.unique(lab).tolist())
    assert set(L.ORGAN_IDS) <= present

    def world_x(i: int) -> float:
        return float((aff[:3, :3] @ np.argwhere(lab == i).mean(0) + aff[:3, 3])[0])

    # RAS: patient right = +x; liver and right kidney right of the aorta, spleen and left kidney left of it
    assert world_x(L.LIVER) > world_x(L.AORTA) > world_x(L.SPLEEN)
    assert world_x(L.RIGHT_KIDNEY) > world_x(L.AORTA) > world_x(L.LEFT_KIDNEY)
    assert np.median(hu[lab == L.AORTA]) > np.median(hu[lab == L.LIVER]) > 40
    assert np.median(hu[lab == L.RIGHT_KIDNEY]) > np.median(hu[lab == L.PANCREAS])
    assert np.median(hu[0, 0, :]) < -900  # air outside the body
    assert np.percentile(hu, 99.9) > 300  # bone


def test_analysis_table(phantom_dir: Path) -> None:
    res = analyze(phantom_dir)
    doc = json.loads((phantom_dir / "dataset.json").read_text())
    labelled = [e for e in doc["training"] if e["subset"] != "unlabelled"]
    assert res["n_unlabelled"] == 10 - len(labelled) > 0  # left out of training, as the paper does
    assert res["n_training"] == len(labelled) and res["n_testing"] == 2
    assert sum(r["cases"] for r in res["subsets"]) == len(labelled)
    for case, entry in zip(res["cases"], labelled, strict=True):
        full = np.asarray(nib.load(phantom_dir / entry["label_full"]).dataobj)
        if entry["subset"] == "all":  # at 48 voxels the adrenals can vanish: fully labelled iff all 13 are there
            assert case["fully_labelled"] == (set(L.ORGAN_IDS) <= set(np.unique(full).tolist()))
        if entry["subset"] == "tumor":
            assert not case["fully_labelled"] and set(case["ids"]) <= {L.TUMOR}
    assert res["n_fully_labelled"] == sum(c["fully_labelled"] for c in res["cases"]) > 0


def test_forced_extent_test_set_and_varied_anatomy(tmp_path: Path) -> None:
    from flare.train.phantoms import ellipsoid, rotation

    # a test set: every case held out, every 2nd a head-to-thigh scan
    doc = make_phantoms(tmp_path, 4, seed=9, size=32, holdout=4, long_every=2)
    assert not doc["training"] and len(doc["testing"]) == 4
    assert [e["params"]["extent"] == "head-to-thigh" for e in doc["testing"]] == [True, False, True, False]
    # organ positions and sizes vary from case to case: no template fits all
    centres = []
    for i in range(4):
        lab = make_case(i, seed=9, size=64, subset="all").label_full
        centres.append([np.argwhere(lab == c).mean(0) if (lab == c).any() else np.zeros(3)
                        for c in (L.LIVER, L.SPLEEN, L.RIGHT_KIDNEY)])
    assert np.std(np.asarray(centres), axis=0).max() > 1.0
    # a rotated ellipsoid keeps its volume and its bounding box holds it
    grid = np.mgrid[-40:41, -40:41, -40:41].astype(float)
    plain = ellipsoid((0, 0, 0), (30, 10, 20))
    turned = ellipsoid((0, 0, 0), (30, 10, 20), rotation(40.0, 25.0))
    v0, v1 = plain.inside(*grid), turned.inside(*grid)
    assert abs(int(v1.sum()) - int(v0.sum())) < 0.02 * v0.sum() and not np.array_equal(v0, v1)
    lo, hi = turned.bbox
    pts = np.stack([g[v1] for g in grid], 1)
    assert np.all(pts >= lo - 1e-6) and np.all(pts <= hi + 1e-6)


def test_tumours_are_soft_tissue_lesions() -> None:
    """A tumour's density is drawn against its host organ's tissue (masses outside organs against soft tissue), never
    against whatever voxel lies at its centre: seed 2026 (the demo's held-out set) has a tumour in the stomach, whose
    centre voxel is gas, one in the retroperitoneal fat and lung nodules."""
    hosts = set()
    for index in (0, 1, 11):
        case = make_case(index, seed=2026, size=48, extent="head-to-thigh" if index % 4 == 0 else None)
        hosts |= {t["host"] for t in case.params["tumors"]}
        tumour = case.label_full == L.TUMOR
        assert tumour.any()
        assert -40.0 < float(np.median(case.hu[tumour])) < 300.0, case.params["tumors"]
    assert {"stomach", "retroperitoneum", "lung"} <= hosts
