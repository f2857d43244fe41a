"""flare.train.run: the model card flare-train writes beside its checkpoints (``OUT/card.json``); the two fold
splits of the paper (stage 1 over the fully labelled cases, stage 2 over all, drawn independently)."""

from __future__ import annotations

from flare.runtime.bundle.card import card_from_raw
from flare.runtime.bundle.manifest import card_errors
from flare.runtime.foundation import labels as L
from flare.train.datalist import draw_folds
from flare.train.run import fold_sets


def test_training_card_from_holdout_and_from_folds() -> None:
    from flare.train.run import data_kind, training_card

    doc = {"name": "flare-phantoms", "synthetic": True, "_path": "/x/phantoms/dataset.json"}
    summary = {"holdout": {"cases": 6, "truth": "label_full", "per_class": {"liver": 0.91, "tumor": float("nan")}}}
    card = training_card(doc, {"name": "tiny"}, [{}] * 34, summary)
    assert card_errors(card) is None
    c = card_from_raw(card)
    assert (c.dataset, c.cases, c.data, c.recipe) == ("flare-phantoms", 34, "synthetic", "tiny")
    assert c.validation_dice == {"liver": 0.91} and "held-out" in c.validation and c.warning() is not None
    folds = {"stage2": [{"val_per_class": {"liver": 0.8, "spleen": 0.4}}, {"val_per_class": {"liver": 0.6}}]}
    c = card_from_raw(training_card({"_path": "/d/FLARE23/dataset.json"}, {"name": "flare23"}, [{}] * 3, folds))
    assert c.dataset == "FLARE23" and c.data == "unknown" and c.validation_dice == {"liver": 0.7, "spleen": 0.4}
    assert data_kind({"synthetic": False}) == "real"


def _entries(n: int) -> list[dict]:
    full, partial = sorted(L.ORGAN_IDS), [L.LIVER, L.SPLEEN]
    return [{"image": f"c{i}.nii.gz", "label": f"l{i}.nii.gz", "fold": i % 5,
             "labels_present": full if i % 2 == 0 else partial} for i in range(n)]


def test_stage_splits_are_independent() -> None:
    entries = _entries(40)
    full = {e["image"] for e in entries if len(e["labels_present"]) == 13}
    s1 = [fold_sets(entries, k, 1, 5, seed=0) for k in range(5)]
    s2 = [fold_sets(entries, k, 2, 5, seed=0) for k in range(5)]
    for (tr1, va1), (tr2, va2) in zip(s1, s2, strict=True):
        assert {e["image"] for e in tr1 + va1} == full  # stage 1: fully labelled cases only
        assert len(tr2) + len(va2) == 40 and va2 == [e for e in entries if e["fold"] == s2.index((tr2, va2))]
    assert sorted(e["image"] for _, va in s1 for e in va) == sorted(full)  # every case validated once
    # the stage-1 validation sets are not the datalist's folds restricted to the fully labelled cases
    by_datalist = [{e["image"] for e in entries if e["image"] in full and e["fold"] == k} for k in range(5)]
    assert [{e["image"] for e in va} for _, va in s1] != by_datalist
    assert fold_sets(entries, 0, 1, 5, seed=0) == s1[0]  # seeded: the same split every time
    assert fold_sets(entries, 0, 1, 5, seed=3) != s1[0]


def test_one_fold_trains_on_everything() -> None:
    entries = _entries(10)
    tr, va = fold_sets(entries, 0, 2, 1)
    assert tr == entries and va == []
    tr1, va1 = fold_sets(entries, 0, 1, 1)
    assert len(tr1) == 5 and va1 == []


def test_draw_folds_balanced_and_does_not_modify_input() -> None:
    entries = _entries(11)
    out = draw_folds(entries, 3, seed=1)
    assert [e["fold"] for e in entries] == [i % 5 for i in range(11)]
    counts = [sum(e["fold"] == k for e in out) for k in range(3)]
    assert sorted(counts) == [3, 4, 4]
