"""The model card in bundle.json: schema-checked, optional (old bundles load with 'unknown'), and the one-line
warning of a bundle trained on synthetic data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _copy_with_card(tiny_bundle: Path, tmp_path: Path, card: dict | None) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    doc = json.loads((root / "bundle.json").read_text())
    if card is None:
        doc.pop("card", None)
    else:
        doc["card"] = card
    (root / "bundle.json").write_text(json.dumps(doc))
    return root


def test_bundle_without_card_loads_with_unknown(tiny_bundle: Path, tmp_path: Path) -> None:
    from flare.runtime.bundle.manifest import load_bundle

    b = load_bundle(_copy_with_card(tiny_bundle, tmp_path, None), verify_hashes=False)
    assert b.card.dataset == "unknown" and b.card.data == "unknown" and b.card.cases is None
    assert b.card.warning() is None
    assert "not a medical device" in b.card.intended_use


def test_synthetic_card_warns_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    from flare.runtime.bundle.manifest import load_bundle

    card = {"dataset": "flare-phantoms", "cases": 34, "data": "synthetic", "recipe": "tiny",
            "trained_at": "2026-12-04", "validation_dice": {"liver": 0.9, "spleen": 0.5}, "licence": "Apache-2.0"}
    b = load_bundle(_copy_with_card(tiny_bundle, tmp_path, card), verify_hashes=False)
    assert b.card.cases == 34 and b.card.validation_dice == {"liver": 0.9, "spleen": 0.5}
    warning = b.card.warning()
    assert warning is not None and "\n" not in warning and "synthetic" in warning and "flare-phantoms" in warning
    assert b.card.to_json()["data"] == "synthetic"


@pytest.mark.parametrize(("card", "words"), [
    ({"data": "phantom"}, ("card.data",)),
    ({"cases": 3.0}, ("card.cases",)),
    ({"validation_dice": {"liver": 1.5}}, ("card.validation_dice.liver",)),
    ({"colour": "red"}, ("card", "colour")),
])
def test_bad_cards_are_one_line_bundle_errors(tiny_bundle: Path, tmp_path: Path, card: dict, words) -> None:
    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.foundation.errors import BundleError

    with pytest.raises(BundleError) as err:
        load_bundle(_copy_with_card(tiny_bundle, tmp_path, card), verify_hashes=False)
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_card_file_is_checked(tmp_path: Path) -> None:
    from flare.runtime.bundle.manifest import read_card_file
    from flare.runtime.foundation.errors import InputError

    good = tmp_path / "card.json"
    good.write_text(json.dumps({"dataset": "FLARE23", "data": "real", "cases": 2200}))
    assert read_card_file(good)["cases"] == 2200
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": "maybe"}))
    with pytest.raises(InputError, match="not a valid model card"):
        read_card_file(bad)


def test_no_bundle_error_names_commands_of_this_install(tmp_path: Path) -> None:
    from flare.runtime.bundle.manifest import how_to_get_a_bundle, load_bundle
    from flare.runtime.foundation.errors import BundleError

    with pytest.raises(BundleError) as err:
        load_bundle(tmp_path / "none")
    assert how_to_get_a_bundle() in str(err.value)
    # this environment has the export extra: flare-demo exists here
    assert "flare-demo" in how_to_get_a_bundle()


def test_no_bundle_error_of_a_runtime_only_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from flare.runtime.bundle.manifest import how_to_get_a_bundle

    monkeypatch.setitem(sys.modules, "torch", None)  # find_spec then reports torch as not importable
    text = how_to_get_a_bundle()
    assert "runtime only" in text and "pip install 'flare-seg[train,export]'" in text
    assert not text.startswith("pass --bundle DIR (or set FLARE_BUNDLE), or make one: flare-demo")
