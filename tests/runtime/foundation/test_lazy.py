"""The one lazy-import helper: nothing is imported until used; a missing package is one line naming the extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flare.runtime.foundation.lazy import DependencyError, lazy_import


def test_lazy_import_is_lazy_and_names_the_extra() -> None:
    missing = lazy_import("flare_no_such_module", extra="gpu")
    assert not missing.available()
    with pytest.raises(DependencyError) as err:
        missing.anything  # noqa: B018 - the attribute access is the import
    text = str(err.value)
    assert "\n" not in text and "flare_no_such_module" in text and "flare-seg[gpu]" in text
    json_mod = lazy_import("json")
    assert json_mod.dumps([1]) == "[1]"


def test_before_runs_once_just_before_the_first_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flare_lazy_probe.py").write_text("import os\nSEEN = os.environ.get('FLARE_LAZY_PROBE')\nOTHER = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FLARE_LAZY_PROBE", raising=False)
    calls: list[str] = []

    def before() -> None:
        calls.append("before")
        monkeypatch.setenv("FLARE_LAZY_PROBE", "set")

    mod = lazy_import("flare_lazy_probe", before=before)
    assert calls == []  # nothing at creation
    assert mod.SEEN == "set" and mod.OTHER == 1  # the module saw what `before` set
    assert calls == ["before"]  # once, not per attribute
    monkeypatch.delitem(sys.modules, "flare_lazy_probe")
