"""Statistics of repeated measurements and agreement between two label maps."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from flare.runtime.foundation.labels import NUM_FLARE_IDS


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, min, max, n of the non-None values (all None -> every figure None, rendered "n/a")."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def dice_per_class(a: np.ndarray, b: np.ndarray, n_labels: int = NUM_FLARE_IDS) -> dict[int, float]:
    """Dice of every foreground id present in ``a`` or ``b`` (same shape, integer ids < ``n_labels``)."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    joint = np.bincount(a.astype(np.intp).ravel() * n_labels + b.astype(np.intp).ravel(),
                        minlength=n_labels * n_labels).reshape(n_labels, n_labels)
    in_a, in_b = joint.sum(axis=1), joint.sum(axis=0)
    out: dict[int, float] = {}
    for k in range(1, n_labels):
        if in_a[k] or in_b[k]:
            out[k] = float(2.0 * joint[k, k] / (in_a[k] + in_b[k]))
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` or None when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)
