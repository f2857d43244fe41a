"""Connected components (cc3d) against scipy.ndimage.label."""

from __future__ import annotations

import itertools

import numpy as np
from flare.runtime.ops.components import components
from scipy import ndimage


def test_components_of_thin_masks() -> None:
    """Every 0/1 pattern of thin boxes (where cc3d 4.1 fails on bool input) gives the expected components."""
    for shape in ((1, 1, 3), (1, 3, 1), (3, 1, 1), (1, 1, 5), (1, 2, 3), (2, 2, 2)):
        n = int(np.prod(shape))
        for bits in itertools.product((False, True), repeat=n):
            mask = np.array(bits, dtype=bool).reshape(shape)
            ids, counts = components(mask)
            ref, n_ref = ndimage.label(mask, structure=np.ones((3, 3, 3)))
            assert len(counts) == n_ref + 1
            assert sorted(counts[1:].tolist()) == sorted(np.bincount(ref.ravel())[1:].tolist())
            assert ((ids > 0) == mask).all()
