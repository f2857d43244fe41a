"""flare.runtime.ops.geometry: boxes, crop/uncrop, cropped and resampled affines."""

from __future__ import annotations

import numpy as np
import pytest
from flare.runtime.ops.geometry import (
    Box,
    box_from_mask,
    box_to_finer_grid,
    crop,
    cropped_affine,
    expand_box,
    resampled_affine,
    spacing_from_affine,
    uncrop,
)
from flare.runtime.ops.resample import resample_linear


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine[:3, :3] @ np.asarray(ijk, dtype=np.float64).T).T + affine[:3, 3]


def test_spacing_from_permuted_flipped_affine() -> None:
    affine = np.array([[0, 0, -1.25, 10], [0.75, 0, 0, -3], [0, -0.8, 0, 7], [0, 0, 0, 1]], dtype=np.float64)
    assert spacing_from_affine(affine) == pytest.approx((0.75, 0.8, 1.25))


def test_box_from_mask_matches_nonzero(rng: np.random.Generator) -> None:
    mask = np.zeros((20, 30, 40), dtype=bool)
    mask[3:9, 11:12, 5:33] = rng.random((6, 1, 28)) > 0.3
    idx = np.nonzero(mask)
    box = box_from_mask(mask)
    assert box == Box(tuple(int(i.min()) for i in idx), tuple(int(i.max()) + 1 for i in idx))
    assert box_from_mask(np.zeros((4, 4, 4), dtype=np.uint8)) is None
    assert np.count_nonzero(crop(mask, box)) == np.count_nonzero(mask)


def test_expand_box_clips_to_shape() -> None:
    box = expand_box(Box((2, 5, 0), (8, 9, 10)), (3, 1, 4), (10, 10, 12))
    assert box == Box((0, 4, 0), (10, 10, 12))
    assert box.shape == (10, 6, 12)


def test_box_rejects_inverted_bounds() -> None:
    with pytest.raises(ValueError):
        Box((3, 0, 0), (2, 1, 1))


@pytest.mark.parametrize("coarse, fine", [((4, 5, 7), (16, 20, 28)), ((7, 9, 11), (23, 30, 41)), ((5, 5, 5), (5, 6, 7))])
def test_box_to_finer_grid_is_smallest_cover(coarse: tuple[int, int, int], fine: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        lo = [int(rng.integers(0, c)) for c in coarse]
        hi = [int(rng.integers(low + 1, c + 1)) for low, c in zip(lo, coarse)]
        box = box_to_finer_grid(Box(tuple(lo), tuple(hi)), coarse, fine)
        for a in range(3):
            r = fine[a] / coarse[a]
            # fine voxel f spans [f, f+1) and coarse voxel c spans [c*r, (c+1)*r) in fine units: they overlap
            overlaps = [f for f in range(fine[a]) if f + 1 > lo[a] * r + 1e-9 and f < hi[a] * r - 1e-9]
            assert (box.lo[a], box.hi[a]) == (overlaps[0], overlaps[-1] + 1)


def test_box_to_finer_grid_exact_multiples() -> None:
    assert box_to_finer_grid(Box((1, 0, 3), (3, 4, 4)), (4, 4, 4), (16, 16, 16)) == Box((4, 0, 12), (12, 16, 16))


def test_crop_is_view_and_uncrop_restores(rng: np.random.Generator) -> None:
    arr = rng.integers(0, 15, (12, 10, 8)).astype(np.uint8)
    box = Box((2, 3, 1), (9, 10, 5))
    part = crop(arr, box)
    assert np.shares_memory(part, arr) and part.shape == box.shape
    full = uncrop(part, box, arr.shape, fill=0)
    expected = np.zeros_like(arr)
    expected[2:9, 3:10, 1:5] = arr[2:9, 3:10, 1:5]
    assert full.dtype == np.uint8 and np.array_equal(full, expected)
    with pytest.raises(ValueError):
        uncrop(part[:-1], box, arr.shape)


def test_cropped_affine_keeps_world_positions() -> None:
    affine = np.array([[-0.7, 0.1, 0, 100], [0, 0.8, 0, -50], [0.05, 0, 2.5, 30], [0, 0, 0, 1]])
    box = Box((5, 7, 2), (20, 30, 9))
    ijk = np.array([[0, 0, 0], [3, 4, 5], [14, 22, 6]])
    assert np.allclose(_world(cropped_affine(affine, box), ijk), _world(affine, ijk + np.array(box.lo)))


@pytest.mark.parametrize("in_shape, out_shape", [((20, 16, 9), (15, 21, 9)), ((8, 30, 12), (19, 7, 25))])
def test_resampled_affine_matches_resample_linear(in_shape: tuple[int, int, int],
                                                  out_shape: tuple[int, int, int]) -> None:
    """A volume whose values are the world coordinates: resampled values equal the new affine's positions."""
    affine = np.array([[0.75, 0, 0, -20], [0, -0.75, 0, 40], [0, 0, 1.25, -300], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in in_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = _world(affine, ijk).reshape(*in_shape, 3)
    new_affine = resampled_affine(affine, in_shape, out_shape)
    out_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    expected = _world(new_affine, out_ijk).reshape(*out_shape, 3)
    # away from the clamped border voxels, linear interpolation of a linear function is exact
    inner = tuple(slice(1, n - 1) if n != m else slice(None) for n, m in zip(out_shape, in_shape))
    for c in range(3):
        got = resample_linear(world[..., c], out_shape)
        assert np.allclose(got[inner], expected[inner][..., c], atol=1e-3)
    assert spacing_from_affine(new_affine) == pytest.approx(
        tuple(0.75 * i / o if a < 2 else 1.25 * i / o for a, (i, o) in enumerate(zip(in_shape, out_shape))))
