"""The one lazy-import helper: nothing is imported until used; a missing package is one line naming the extra."""

from __future__ import annotations

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
