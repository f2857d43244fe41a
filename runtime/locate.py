"""Locator stage: whole CT at the locator spacing → organ-union mask → x/y crop box with a margin; z kept whole
(tumors may sit anywhere along the body)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .engines import Engine
from .ensemble import sliding_window
from .geometry import Box, box_from_mask, box_to_finer_grid, expand_box
from .resample import normalise_hu, output_shape, resample_linear

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


def _foreground(scores: np.ndarray) -> np.ndarray:
    """Organ mask from locator scores: logit > 0 for one channel, argmax > 0 for several."""
    if scores.shape[0] == 1:
        return scores[0] > 0
    return scores.argmax(axis=0) > 0


def locate(data_ras: np.ndarray, spacing: tuple[float, float, float], engine: Engine, *,
           locator_spacing: tuple[float, float, float], roi: tuple[int, int, int], margin_mm: float,
           hu_window: tuple[float, float]) -> LocateResult:
    """Crop box (in the RAS voxel grid of ``data_ras``) around the locator's organ union, full z."""
    coarse = output_shape(data_ras.shape, spacing, locator_spacing)
    small = resample_linear(data_ras, coarse)
    normalise_hu(small, hu_window, out=small)
    scores = np.zeros((engine.out_channels,) + small.shape, dtype=np.float32)
    plan = sliding_window(small, engine, roi, scores, overlap=0.0, blend="constant", activation="none")
    coarse_box = box_from_mask(_foreground(scores))
    if coarse_box is None:
        log.warning("the locator found no organs: using the whole image")
        return LocateResult(whole_box(data_ras.shape), False, coarse, plan.n_tiles)
    fine = box_to_finer_grid(coarse_box, coarse, data_ras.shape)
    margin = tuple(int(np.ceil(margin_mm / s)) for s in spacing[:2]) + (0,)
    fine = expand_box(fine, margin, data_ras.shape)  # type: ignore[arg-type]
    box = Box((fine.lo[0], fine.lo[1], 0), (fine.hi[0], fine.hi[1], int(data_ras.shape[2])))
    return LocateResult(box, True, coarse, plan.n_tiles)
