from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flare.runtime.bundle.manifest import load_bundle
from flare.runtime.foundation.errors import BundleError


def test_tiny_bundle_loads(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    assert len(b.folds) == 2 and b.locator is not None
    assert b.folds[0].out_channels == 13 and b.precisions == ("fp32",)
    assert b.spacing_mm == (3.0, 3.0, 3.0) and b.hu_window == (-250.0, 250.0)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_tampered_model_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    b = _copy(tiny_bundle, tmp_path)
    with open(b / "fold1.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(b)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
    (lambda d: d.update(format="other"), "not a flare bundle"),
    (lambda d: d.pop("folds"), "missing field folds"),
    (lambda d: d["labels"]["labels"].pop(), "label registry differs"),
    (lambda d: d["folds"][0]["files"]["fp32"].update(path="../x.onnx"), "outside the bundle"),
    (lambda d: d["postprocess"].update(mode="loose"), "postprocess.mode must be one of paper, strict, got 'loose'"),
])
def test_bad_bundle_json(tiny_bundle: Path, tmp_path: Path, edit, message: str) -> None:
    b = _copy(tiny_bundle, tmp_path)
    doc = json.loads((b / "bundle.json").read_text())
    edit(doc)
    (b / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(b)
    assert "\n" not in str(err.value)


def test_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot parse"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("edit, mode", [
    (lambda d: None, "paper"),  # new bundles name the paper's rules
    (lambda d: d["postprocess"].pop("mode"), "paper"),  # bundles written before the key existed
    (lambda d: d.pop("postprocess"), "paper"),
    (lambda d: d["postprocess"].update(mode="strict"), "strict"),
])
def test_postprocess_mode(tiny_bundle: Path, tmp_path: Path, edit, mode: str) -> None:
    b = _copy(tiny_bundle, tmp_path)
    doc = json.loads((b / "bundle.json").read_text())
    assert doc["postprocess"]["mode"] == "paper"
    edit(doc)
    (b / "bundle.json").write_text(json.dumps(doc))
    assert load_bundle(b).postprocess_mode == mode
