"""The model contract's probe with the divisor a 4-level network declares (8) and one it does not accept (4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flare.runtime.bundle.manifest import load_bundle
from flare.runtime.foundation.errors import BundleError


def test_four_level_fold_passes_the_probe_with_divisor_8(parity_bundle4: Path) -> None:
    from flare.runtime.inference.engines import create_engine

    b = load_bundle(parity_bundle4)
    assert b.fold_divisor == 8 and b.locator is not None and b.locator.spatial_divisor == 8
    engine = create_engine(b.folds[0], "cpu", "fp32")  # the probe runs one 8x8x8 tile
    assert engine.out_channels == 13


def test_a_divisor_the_network_refuses_is_one_line(parity_bundle4: Path) -> None:
    from flare.runtime.inference.engines import create_engine

    spec = dataclasses.replace(load_bundle(parity_bundle4).folds[0], spatial_divisor=4)
    with pytest.raises(BundleError, match=r"fails on a 4x4x4 tile \(declared spatial_divisor 4\)"):
        create_engine(spec, "cpu", "fp32")
