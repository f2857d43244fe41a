"""Datalists: a FLARE23-style tree (imagesTr/labelsTr/unlabeledTr) -> flare-train datalist; Auto3DSeg datalists;
paths relative to the datalist's folder; unlabelled cases kept out of training unless asked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.errors import InputError
from flare.train.cli import app
from flare.train.datalist import build_datalist, given_ids, label_ids, load_datalist, write_datalist
from flare.train.phantoms import make_phantoms
from typer.testing import CliRunner


def flare23_tree(root: Path, cases: int = 7, unlabelled: int = 2, size: int = 48) -> Path:
    """A FLARE23-style tree from phantoms: ``cases`` labelled (imagesTr/<id>_0000 + labelsTr/<id>), one image
    without a label, ``unlabelled`` images in unlabeledTr/."""
    ph = root / "_phantoms"
    doc = make_phantoms(ph, 2 * (cases + 1 + unlabelled), seed=3, size=size, holdout=0, folds=5)
    labelled = [e for e in doc["training"] if "label" in e][:cases]  # unlabelled phantoms have no label file
    entries = labelled + [e for e in doc["training"] if e not in labelled][:1 + unlabelled]
    for sub in ("imagesTr", "labelsTr", "unlabeledTr"):
        (root / sub).mkdir(parents=True)
    for n, e in enumerate(entries):
        cid = f"FLARE23_{n:04d}"
        if n < cases + 1:
            shutil.copy(ph / e["image"], root / "imagesTr" / f"{cid}_0000.nii.gz")
            if n < cases:
                shutil.copy(ph / e["label"], root / "labelsTr" / f"{cid}.nii.gz")
        else:
            shutil.copy(ph / e["image"], root / "unlabeledTr" / f"{cid}_0000.nii.gz")
    shutil.rmtree(ph)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return flare23_tree(tmp_path_factory.mktemp("flare23") / "FLARE23")


def test_build_datalist_from_flare23_tree(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "lists" / "flare23.json"
    doc = build_datalist(tree, out, folds=5, seed=7)
    assert len(doc["training"]) == 7 and len(doc["unlabeled"]) == 3  # 1 image without label + 2 in unlabeledTr
    saved = json.loads(out.read_text())
    first = saved["training"][0]
    for key, path in (("image", "imagesTr/FLARE23_0000_0000.nii.gz"), ("label", "labelsTr/FLARE23_0000.nii.gz")):
        assert not Path(first[key]).is_absolute()  # relative to the datalist's folder
        assert (out.parent / first[key]).resolve() == (tree / path).resolve()
    assert sorted({e["fold"] for e in saved["training"]}) == [0, 1, 2, 3, 4]
    for e in load_datalist(out)["training"]:  # labels_present is what the label file holds
        assert set(e["labels_present"]) == label_ids(e["label"]) == given_ids(e)
        assert set(e["labels_present"]) <= set(range(1, L.NUM_FLARE_IDS))
    again = build_datalist(tree, tmp_path / "again.json", folds=5, seed=7)
    other = build_datalist(tree, tmp_path / "other.json", folds=5, seed=8)
    folds = [e["fold"] for e in doc["training"]]
    assert folds == [e["fold"] for e in again["training"]] and folds != [e["fold"] for e in other["training"]]
    loaded = load_datalist(out)  # unlabelled cases stay out of training ...
    assert len(loaded["training"]) == 7 and len(loaded["unlabeled"]) == 3
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in loaded["training"])
    with_u = load_datalist(out, include_unlabelled=True)  # ... unless asked
    assert len(with_u["training"]) == 10 and not with_u["unlabeled"]
    assert all("fold" in e for e in with_u["training"])
    inc = build_datalist(tree, tmp_path / "inc.json", include_unlabelled=True)
    assert len(inc["training"]) == 10 and sum(1 for e in inc["training"] if "label" not in e) == 3


def test_datalist_cli_and_analyze(tree: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "dl.json"
    res = runner.invoke(app, ["datalist", str(tree), "-o", str(out), "--folds", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "7 training cases" in res.output and "3 unlabelled listed apart" in res.output
    (tmp_path / "an").mkdir()
    res = runner.invoke(app, ["analyze", str(out), "-o", str(tmp_path / "an" / "analysis.json")])
    assert res.exit_code == 0, res.output
    an = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert an["n_training"] == 7 and an["n_unlabelled"] == 3 and an["datalist"] == "../dl.json"
    res = runner.invoke(app, ["datalist", str(tmp_path / "nope"), "-o", str(out)])
    assert res.exit_code == 2 and "no images" in res.output and "Traceback" not in res.output


def test_datalist_and_analyze_never_replace_what_they_read(tree: Path, tmp_path: Path) -> None:
    """-o onto an image, a label, the datalist being analysed or a file it lists: one line, exit 2, file intact."""
    root = tmp_path / "FLARE23"
    shutil.copytree(tree, root)
    runner = CliRunner()
    image, label = root / "imagesTr" / "FLARE23_0000_0000.nii.gz", root / "labelsTr" / "FLARE23_0000.nii.gz"
    listed = tmp_path / "dl.json"
    assert runner.invoke(app, ["datalist", str(root), "-o", str(listed), "-q"]).exit_code == 0
    notes = root / "imagesTr" / "notes.json"  # the user's, in a folder the datalist reads
    notes.write_text("{}")
    before = {p: p.read_bytes() for p in (image, label, listed, notes)}
    for args, words in (((root, "-o", notes), "input folder"), ((root, "-o", image), "ending in .json"),
                        ((root, "-o", tmp_path / "dl.txt"), "ending in .json")):
        res = runner.invoke(app, ["datalist", *map(str, args), "-q"])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
    for target, words in ((listed, "is the input"), (label, ".json"), (tmp_path / "a.nii.gz", ".json")):
        res = runner.invoke(app, ["analyze", str(listed), "-o", str(target)])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "a.nii.gz").exists()


def test_auto3dseg_datalist(tree: Path, tmp_path: Path) -> None:
    lists = tmp_path / "configs"
    lists.mkdir()
    doc = {"dataroot": str(tree),
           "training": [{"image": ["imagesTr/FLARE23_0000_0000.nii.gz"], "label": "labelsTr/FLARE23_0000.nii.gz",
                         "fold": 0},
                        {"image": "imagesTr/FLARE23_0001_0000.nii.gz", "label": "labelsTr/FLARE23_0001.nii.gz",
                         "fold": 1},
                        {"image": "unlabeledTr/FLARE23_0008_0000.nii.gz", "fold": 1}],
           "testing": [{"image": "imagesTr/FLARE23_0007_0000.nii.gz"}]}
    (lists / "datalist.json").write_text(json.dumps(doc))
    loaded = load_datalist(lists / "datalist.json")
    assert [Path(e["image"]).name for e in loaded["training"]] == ["FLARE23_0000_0000.nii.gz",
                                                                   "FLARE23_0001_0000.nii.gz"]
    assert len(loaded["unlabeled"]) == 1 and Path(loaded["testing"][0]["image"]).is_file()
    rel = {**doc, "dataroot": os.path.relpath(tree, lists)}  # a relative dataroot resolves from the file
    (lists / "rel.json").write_text(json.dumps(rel))
    assert load_datalist(lists / "rel.json")["training"][0]["image"] == loaded["training"][0]["image"]
    # written back by flare: relative to the new file, no dataroot, still resolvable
    write_datalist(loaded, tmp_path / "elsewhere" / "copy.json")
    copy = load_datalist(tmp_path / "elsewhere" / "copy.json")
    assert [e["image"] for e in copy["training"]] == [e["image"] for e in loaded["training"]]
    bad = {**doc, "training": [{"image": ["a.nii.gz", "b.nii.gz"], "label": "l.nii.gz"}]}
    (lists / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="2 channels"):
        load_datalist(lists / "bad.json")
    missing = {**doc, "training": [{"image": "imagesTr/none_0000.nii.gz", "label": "x.nii.gz"}]}
    (lists / "missing.json").write_text(json.dumps(missing))
    with pytest.raises(InputError, match="does not exist"):
        load_datalist(lists / "missing.json")


def test_step_by_step_with_relative_out_from_another_cwd(tree: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """datalist -> locator -> fit x2 -> pseudolabel -> fit x2 with ``-o ck`` relative to a cwd that is neither the
    data's nor the datalist's folder (before: "…/ck/ck/pseudolabels/… does not exist")."""
    from flare.train.config import load_config

    build_datalist(tree, tmp_path / "lists" / "dl.json", folds=2, seed=1)
    fast = {"spacing_mm": [8.0, 8.0, 8.0], "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2},
            "train": {"epochs": 1, "steps_per_epoch": 1, "val_every": 1, "tensorboard": False},
            "stage2": {"epochs": 1, "init_from_stage1": True},
            "locator": {"spacing_mm": [8.0, 8.0, 8.0], "train": {"epochs": 1, "steps_per_epoch": 1}}}
    (tmp_path / "fast.json").write_text(json.dumps(load_config("tiny", fast)))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    runner = CliRunner()
    common = ["-c", "../fast.json", "-o", "ck", "-q"]
    steps = [["locator", "../lists/dl.json"]]
    steps += [["fit", "../lists/dl.json", "--stage", "1", "--fold", str(k)] for k in range(2)]
    steps += [["pseudolabel", "../lists/dl.json", "--folds", "2"]]
    steps += [["fit", "ck/dataset_stage2.json", "--stage", "2", "--fold", str(k),
               "--init", f"ck/stage1/fold{k}"] for k in range(2)]
    for args in steps:
        res = runner.invoke(app, args + common)
        assert res.exit_code == 0, f"{args}: {res.output}"
    stage2 = json.loads((work / "ck" / "dataset_stage2.json").read_text())
    labels = [e["label"] for e in stage2["training"] if "label_given" in e]
    assert labels and all(lab.startswith("pseudolabels/") for lab in labels)  # relative to the file's folder
    for name in ("locator", "stage1/fold0", "stage1/fold1", "fold0", "fold1"):
        assert (work / "ck" / name / "model.pt").is_file() and (work / "ck" / name / "done.json").is_file()
    # the same stage-2 datalist resolves from anywhere, and so does an absolute -o
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["fit", str(work / "ck" / "dataset_stage2.json"), "--stage", "2", "--fold", "0",
                              "-c", "fast.json", "-o", str(tmp_path / "abs"), "-q"])
    assert res.exit_code == 0, res.output
