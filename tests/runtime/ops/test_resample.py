"""flare.runtime.ops.resample against PyTorch (trilinear / nearest-exact, align_corners=False) and MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flare.runtime.ops import resample
from flare.runtime.ops.resample import normalise_hu, output_shape, resample_linear, resample_nearest

SHAPE_PAIRS = [
    ((17, 23, 9), (11, 31, 9)),    # down, up, identity
    ((32, 32, 32), (16, 8, 5)),    # integer and odd down-sampling
    ((5, 7, 3), (13, 19, 11)),     # strong up-sampling, odd sizes
    ((1, 6, 4), (3, 1, 7)),        # single-voxel axes in and out
    ((40, 33, 21), (30, 25, 27)),  # FLARE-like: shrink x/y, grow z
]


def _torch(arr: np.ndarray, out_shape: tuple[int, int, int], mode: str) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return torch.nn.functional.interpolate(x, size=out_shape, mode=mode, **kwargs)[0, 0].numpy()


def _layouts(arr: np.ndarray) -> dict[str, np.ndarray]:
    """The same values in C order, Fortran order (nibabel) and as a flipped/transposed view (to_canonical)."""
    view = np.asfortranarray(np.flip(arr, axis=(0, 2)).transpose(1, 0, 2)).transpose(1, 0, 2)[::-1, :, ::-1]
    assert np.array_equal(view, arr)
    return {"C": arr, "F": np.asfortranarray(arr), "view": view}


@pytest.mark.parametrize("in_shape, out_shape", SHAPE_PAIRS)
def test_linear_matches_torch_trilinear(in_shape: tuple[int, int, int], out_shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(in_shape))
    arr = rng.standard_normal(in_shape).astype(np.float32)
    ref = _torch(arr, out_shape, "trilinear")
    for name, a in _layouts(arr).items():
        got = resample_linear(a, out_shape)
        assert got.dtype == np.float32 and got.shape == out_shape, name
        assert np.max(np.abs(got - ref)) <= 1e-4, name


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float64, np.int64, np.bool_])
def test_linear_accepts_any_real_dtype(dtype: type) -> None:
    rng = np.random.default_rng(3)
    arr = (rng.integers(-1024, 3000, (13, 10, 7)) if dtype not in (np.uint8, np.bool_)
           else rng.integers(0, 2 if dtype is np.bool_ else 255, (13, 10, 7))).astype(dtype)
    got = resample_linear(arr, (9, 14, 11))
    ref = _torch(arr.astype(np.float64), (9, 14, 11), "trilinear")
    assert got.dtype == np.float32
    assert np.max(np.abs(got - ref)) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("in_shape, out_shape", SHAPE_PAIRS + [((30, 20, 10), (10, 20, 30))])
def test_nearest_identical_to_torch_nearest_exact(in_shape: tuple[int, int, int],
                                                  out_shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(len(in_shape) + in_shape[0])
    labels = rng.integers(0, 15, in_shape).astype(np.uint8)
    ref = _torch(labels, out_shape, "nearest-exact").astype(np.uint8)
    for name, a in _layouts(labels).items():
        got = resample_nearest(a, out_shape)
        assert got.dtype == np.uint8 and np.array_equal(got, ref), name


def test_two_threads_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    arr = rng.integers(-1000, 1000, (48, 40, 36)).astype(np.int16)
    labels = rng.integers(0, 15, (30, 31, 29)).astype(np.uint8)
    single_lin, single_nn = resample_linear(arr, (36, 30, 45)), resample_nearest(labels, (48, 40, 36))
    monkeypatch.setattr(resample, "MAX_THREADS", 2)
    monkeypatch.setattr(resample, "_MIN_VOXELS_PER_THREAD", 1000)
    assert np.array_equal(resample_linear(arr, (36, 30, 45)), single_lin)
    assert np.array_equal(resample_nearest(labels, (48, 40, 36)), single_nn)
    assert np.max(np.abs(single_lin - _torch(arr, (36, 30, 45), "trilinear"))) <= 1e-4 * 1000  # |values| < 1000


def test_identity_and_output_order() -> None:
    arr = np.asfortranarray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    same = resample_linear(arr, arr.shape)
    assert same.dtype == np.float32 and np.array_equal(same, arr)
    assert same.flags.f_contiguous  # keeps the input's memory order
    assert resample_nearest(arr, arr.shape).dtype == np.int16


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        resample_linear(np.zeros((4, 4)), (2, 2, 2))
    with pytest.raises(TypeError):
        resample_linear(np.zeros((2, 2, 2), dtype=np.complex64), (3, 3, 3))
    with pytest.raises(ValueError):
        resample_nearest(np.zeros((2, 2, 2), dtype=np.uint8), (0, 3, 3))


def test_output_shape() -> None:
    assert output_shape((512, 512, 269), (0.75, 0.75, 1.25), (1.0, 1.0, 1.0)) == (384, 384, 336)
    assert output_shape((122, 101, 30), (3.0, 3.0, 3.0), (4.0, 4.0, 4.0)) == (92, 76, 22)
    assert output_shape((1, 2, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)


def test_normalise_hu_matches_monai(rng: np.random.Generator) -> None:
    from monai.transforms import ScaleIntensityRange

    hu = rng.integers(-1024, 2000, (9, 8, 7)).astype(np.int16)
    got = normalise_hu(hu)
    ref = ScaleIntensityRange(a_min=-250, a_max=250, b_min=0.0, b_max=1.0, clip=True)(hu.astype(np.float32))
    assert got.dtype == np.float32 and np.allclose(got, np.asarray(ref), atol=1e-6)
    assert got.min() == 0.0 and got.max() == 1.0
    buf = hu.astype(np.float32)
    assert normalise_hu(buf, out=buf) is buf and np.array_equal(buf, got)
    with pytest.raises(ValueError):
        normalise_hu(hu, window=(100, -100))
