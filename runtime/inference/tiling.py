"""Tile plans for sliding-window inference (the scheme of MONAI ``sliding_window_inference``).

Per axis: ``interval = max(1, int(roi * (1 - overlap)))``, ``n = ceil((size - roi) / interval) + 1`` tiles, start
``i * interval`` clipped to ``size - roi``. A volume smaller than the roi along an axis is padded with zeros,
``diff // 2`` before and the rest after. With overlap 0 (the paper's default) tiles do not overlap except the last
one along an axis, which is shifted back to end at the volume's edge.

The work is bounded before it starts: the overlap is at most :data:`MAX_OVERLAP`, and when the crop is known the
plan in the bundle's own tiles may hold at most ``FLARE_MAX_TILES`` tiles per network (default
:data:`DEFAULT_MAX_TILES`; ``plan_tiles(..., limit=max_tiles())``, one line otherwise): an overlap of 0.999 on a small
volume is hundreds of thousands of tiles, hours of work from one request. Smaller tiles chosen for a GPU memory budget
are not counted against it (the limit gates the request, not the memory fallback's choice).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
from flare.runtime.foundation.errors import InputError

__all__ = ["DEFAULT_MAX_TILES", "ENV_MAX_TILES", "MAX_OVERLAP", "TilePlan", "ceil_to", "effective_roi",
           "importance_map", "max_tiles", "plan_tiles"]

MAX_OVERLAP = 0.95
"""The largest tile overlap ratio flare-run, the Python API and flare-serve accept."""
ENV_MAX_TILES = "FLARE_MAX_TILES"
DEFAULT_MAX_TILES = 20_000
"""Tiles per network and image (a FLARE-size 1 mm crop in 224³ tiles at overlap 0.9 needs about 4,500)."""


def max_tiles() -> int:
    """``FLARE_MAX_TILES`` (a positive integer), else :data:`DEFAULT_MAX_TILES`."""
    text = os.environ.get(ENV_MAX_TILES)
    if not text:
        return DEFAULT_MAX_TILES
    if not text.strip().isdigit() or int(text) < 1:
        raise InputError(None, f"{ENV_MAX_TILES}={text!r} is not a positive integer")
    return int(text)


def ceil_to(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


def effective_roi(shape: tuple[int, ...], roi: tuple[int, ...], divisor: int = 16) -> tuple[int, int, int]:
    """Per axis ``min(roi, ceil_to(size, divisor))``: never a tile bigger than the volume needs."""
    if any(r % divisor for r in roi):
        raise ValueError(f"roi {roi} must be divisible by {divisor}")
    return tuple(min(int(r), ceil_to(int(s), divisor)) for s, r in zip(shape, roi))  # type: ignore[return-value]


@dataclass(frozen=True)
class TilePlan:
    shape: tuple[int, int, int]          # volume shape before padding
    padded_shape: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    roi: tuple[int, int, int]
    overlap: float
    starts: tuple[tuple[int, int, int], ...]  # tile origins in the padded volume

    @property
    def n_tiles(self) -> int:
        return len(self.starts)

    def slices(self, start: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + r) for s, r in zip(start, self.roi))  # type: ignore[return-value]

    def unpad_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(b, b + s) for b, s in zip(self.pad_before, self.shape))  # type: ignore[return-value]


def _axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    interval = max(1, int(roi * (1.0 - overlap)))
    n = math.ceil(max(size - roi, 0) / interval) + 1
    return sorted({min(i * interval, size - roi) for i in range(n)})


def plan_tiles(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float = 0.0, *,
               limit: int | None = None) -> TilePlan:
    """Tile plan for a volume of ``shape`` (3 spatial dims) with tiles of ``roi``; with ``limit``, more tiles than
    that is a one-line ``InputError``."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    shape3 = tuple(int(s) for s in shape)
    roi3 = tuple(int(r) for r in roi)
    padded = tuple(max(s, r) for s, r in zip(shape3, roi3))
    before = tuple((p - s) // 2 for p, s in zip(padded, shape3))
    per_axis = [_axis_starts(p, r, overlap) for p, r in zip(padded, roi3)]
    n_tiles = math.prod(len(a) for a in per_axis)
    if limit is not None and n_tiles > limit:
        raise InputError(None, f"tile overlap {overlap:g} makes {n_tiles:,} tiles of {'x'.join(map(str, roi3))} for "
                               f"this image, more than the limit of {limit:,} ({ENV_MAX_TILES}); use a smaller overlap")
    starts = tuple(itertools.product(*per_axis))
    return TilePlan(shape3, padded, before, roi3, overlap, starts)  # type: ignore[arg-type]


def importance_map(roi: tuple[int, int, int], mode: str = "constant", sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights of one tile: ones (``constant``) or a separable Gaussian (sigma = sigma_scale × side),
    normalised to a maximum of 1 and floored at 1e-3 so that every voxel keeps a weight."""
    if mode == "constant":
        return np.ones(roi, dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"blend mode must be 'constant' or 'gaussian', got {mode!r}")
    axes = []
    for r in roi:
        centre = (r - 1) / 2.0
        sigma = max(sigma_scale * r, 1e-6)
        axes.append(np.exp(-0.5 * ((np.arange(r) - centre) / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = (w / w.max()).astype(np.float32)
    return np.maximum(w, np.float32(1e-3))
