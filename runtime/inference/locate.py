"""Locator stage: whole CT at the locator spacing → organ-union mask → x/y crop box with a margin; z kept whole
(tumors may sit anywhere along the body)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from flare.runtime.inference.budget import run_with_fallback
from flare.runtime.inference.device import to_host
from flare.runtime.inference.ensemble import foreground_uint8, tile_runner, tiled_labels
from flare.runtime.ops.geometry import Box, box_from_mask, box_to_finer_grid, expand_box
from flare.runtime.ops.resample import normalise_hu, output_shape, resample_linear

log = logging.getLogger("flare.runtime")

__all__ = ["LocateResult", "locate", "whole_box"]


@dataclass(frozen=True)
class LocateResult:
    box: Box
    found: bool
    coarse_shape: tuple[int, int, int]
    tiles: int


def whole_box(shape: tuple[int, ...]) -> Box:
    return Box((0, 0, 0), tuple(int(s) for s in shape))  # type: ignore[arg-type]


def locate(data_ras: Any, spacing: tuple[float, float, float], engine: Any, *,
           locator_spacing: tuple[float, float, float], roi: tuple[int, int, int], margin_mm: float,
           hu_window: tuple[float, float], xp: ModuleType = np,
           choose_rois: Callable[[tuple[int, int, int]], Sequence[tuple[int, int, int]]] | None = None,
           on_cpu: Callable[[], Any] | None = None, divisor: int = 16) -> LocateResult:
    """Crop box (in the RAS voxel grid of ``data_ras``) around the locator's organ union, full z. ``data_ras`` is an
    array of ``xp`` (the uploaded image on the device): resampling and normalisation run where it lives.

    The locator runs through the same tile-major core as the folds (raw logits, organ mask decided per tile).
    ``choose_rois(coarse_shape)`` gives the tiles to try under the memory budget (default: ``roi``); an
    out-of-memory error retries with the next, then runs ``on_cpu()``'s engine on the host. ``divisor``: the
    locator's ``spatial_divisor`` (tiles are padded up to its multiples)."""
    coarse = output_shape(data_ras.shape, spacing, locator_spacing)
    small = resample_linear(data_ras, coarse, xp)
    normalise_hu(small, hu_window, out=small, xp=xp)
    kw: dict[str, Any] = {"channels": engine.out_channels, "activation": "none", "decide": foreground_uint8,
                          "divisor": divisor}

    def attempt(tile: tuple[int, int, int]) -> Any:
        return tiled_labels(small, [tile_runner(engine, xp)], tile, xp, **kw)

    def cpu() -> Any:
        assert on_cpu is not None
        return tiled_labels(to_host(small), [on_cpu().run], roi, np, **kw)

    rois = list(choose_rois(coarse)) if choose_rois is not None else [roi]
    mask, plan, _ = run_with_fallback(attempt, rois, cpu if on_cpu is not None else None)
    coarse_box = box_from_mask(mask > 0)
    if coarse_box is None:
        log.warning("the locator found no organs: using the whole image")
        return LocateResult(whole_box(data_ras.shape), False, coarse, plan.n_tiles)
    fine = box_to_finer_grid(coarse_box, coarse, data_ras.shape)
    margin = tuple(int(np.ceil(margin_mm / s)) for s in spacing[:2]) + (0,)
    fine = expand_box(fine, margin, data_ras.shape)  # type: ignore[arg-type]
    box = Box((fine.lo[0], fine.lo[1], 0), (fine.hi[0], fine.hi[1], int(data_ras.shape[2])))
    return LocateResult(box, True, coarse, plan.n_tiles)
