"""The model card flare-train writes beside its checkpoints (``OUT/card.json``)."""

from __future__ import annotations

from flare.runtime.bundle.card import card_from_raw
from flare.runtime.bundle.manifest import card_errors


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
