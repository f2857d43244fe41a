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


def test_hashes_cached_per_file_version_and_only_for_the_loaded_precision(tiny_bundle: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from flare.runtime.bundle.manifest import HASH_CACHE_NAME, verify_bundle

    b = _copy(tiny_bundle, tmp_path)
    (b / HASH_CACHE_NAME).unlink(missing_ok=True)
    bundle = load_bundle(b, verify_hashes=False)
    fp32 = {m.name: "fp32" for m in (bundle.locator, *bundle.folds) if m is not None}
    assert verify_bundle(bundle, fp32) == 3 and (b / HASH_CACHE_NAME).is_file()
    assert verify_bundle(bundle, fp32) == 0  # second start: nothing read
    assert verify_bundle(bundle, {"fold0": "fp32"}) == 0
    st = os.stat(b / "fold1.fp32.onnx")
    os.utime(b / "fold1.fp32.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # a new file version
    assert verify_bundle(bundle, fp32) == 1
    with open(b / "fold1.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        verify_bundle(bundle, fp32)
    assert verify_bundle(bundle, {"fold0": "fp32"}) == 0  # fold1 not loaded: not checked
    # changed in place with its modification time put back (touch -r): the inode's change time still tells
    model = b / "fold0.fp32.onnx"
    assert verify_bundle(bundle, {"fold0": "fp32"}) == 0
    st = os.stat(model)
    blob = bytearray(model.read_bytes())
    blob[len(blob) // 2] ^= 0x55
    model.write_bytes(bytes(blob))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(model).st_size == st.st_size and os.stat(model).st_ino == st.st_ino
    with pytest.raises(BundleError, match="sha256 mismatch"):
        verify_bundle(bundle, {"fold0": "fp32"})
    if os.geteuid() == 0:
        return  # root may write into a read-only folder: the fallback below cannot be seen
    # a read-only bundle folder: the cache goes under $XDG_CACHE_HOME/flare/sha256
    ro = _copy(tiny_bundle, tmp_path / "ro")
    (ro / HASH_CACHE_NAME).unlink(missing_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    os.chmod(ro, 0o555)
    try:
        rob = load_bundle(ro, verify_hashes=False)
        assert verify_bundle(rob, fp32) == 3 and verify_bundle(rob, fp32) == 0
        assert not (ro / HASH_CACHE_NAME).exists() and list((tmp_path / "cache" / "flare" / "sha256").glob("*.json"))
    finally:
        os.chmod(ro, 0o755)


@pytest.mark.parametrize("edit, divisor", [
    (lambda d: None, 16),  # every model 16: the tiny 5-level folds (and bundles written before divisors per network)
    (lambda d: [f.update(spatial_divisor=8) for f in d["folds"]], 8),  # 4-level folds
    (lambda d: d["folds"][0].update(spatial_divisor=8), 16),  # mixed: tiles must suit every fold
    (lambda d: [f.pop("spatial_divisor") for f in d["folds"]], 16),  # the key missing: 16
])
def test_fold_divisor(tiny_bundle: Path, tmp_path: Path, edit, divisor: int) -> None:
    b = _copy(tiny_bundle, tmp_path)
    doc = json.loads((b / "bundle.json").read_text())
    edit(doc)
    (b / "bundle.json").write_text(json.dumps(doc))
    assert load_bundle(b).fold_divisor == divisor
