"""flare.runtime.ops.lr_split: left/right split of merged kidneys and adrenals in world coordinates."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from flare.runtime.foundation.labels import AORTA, LEFT_ADRENAL, LEFT_KIDNEY, RIGHT_ADRENAL, RIGHT_KIDNEY
from flare.runtime.ops.lr_split import reference_line, split_left_right
from nibabel import orientations

LABELS_FILE = "ts_abdomen_labels_flare_ids.nii.gz"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _merge(truth: np.ndarray) -> np.ndarray:
    merged = truth.copy()
    merged[merged == LEFT_KIDNEY] = RIGHT_KIDNEY
    merged[merged == LEFT_ADRENAL] = RIGHT_ADRENAL
    return merged


@pytest.fixture(scope="module")
def real_labels() -> nib.Nifti1Image:
    return nib.load(data_path(LABELS_FILE))


def _reoriented(img: nib.Nifti1Image, codes: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The label array and affine of ``img`` flipped/permuted to the axis codes ``codes`` (nibabel's own maths)."""
    transform = orientations.ornt_transform(orientations.io_orientation(img.affine), orientations.axcodes2ornt(codes))
    out = img.as_reoriented(transform)
    assert nib.aff2axcodes(out.affine) == codes
    return np.asarray(out.dataobj).astype(np.uint8), out.affine


def _assert_split_matches(truth: np.ndarray, split: np.ndarray) -> None:
    for label_id, min_dice in ((RIGHT_KIDNEY, 0.99), (LEFT_KIDNEY, 0.99), (RIGHT_ADRENAL, 0.95), (LEFT_ADRENAL, 0.95)):
        assert _dice(split == label_id, truth == label_id) >= min_dice, label_id
    others = ~np.isin(truth, (RIGHT_KIDNEY, LEFT_KIDNEY, RIGHT_ADRENAL, LEFT_ADRENAL))
    np.testing.assert_array_equal(split[others], truth[others])


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("S", "L", "P"), ("A", "I", "R")])
def test_real_labels_every_orientation(real_labels, codes):
    truth, affine = _reoriented(real_labels, codes)
    merged = _merge(truth)
    before = merged.copy()
    split = split_left_right(merged, affine)
    assert split.dtype == np.uint8 and split.shape == truth.shape
    np.testing.assert_array_equal(merged, before)  # input untouched
    _assert_split_matches(truth, split)
    assert reference_line(merged, affine).source == "aorta"


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S")])
def test_real_labels_without_aorta_uses_labels_centre(real_labels, codes):
    truth, affine = _reoriented(real_labels, codes)
    truth[truth == AORTA] = 0
    merged = _merge(truth)
    line = reference_line(merged, affine)
    assert line.source == "labels-centre"
    _assert_split_matches(truth, split_left_right(merged, affine))


def test_aorta_line_follows_world_x(real_labels):
    truth, affine = _reoriented(real_labels, ("L", "P", "S"))
    line = reference_line(truth, affine)
    world = nib.affines.apply_affine(affine, np.argwhere(truth == AORTA))
    assert line.x_at(world[:, 2].mean()) == pytest.approx(world[:, 0].mean(), abs=5.0)
    # held constant beyond the ends
    assert line.x_at(-1e4) == pytest.approx(line.x[0]) and line.x_at(1e4) == pytest.approx(line.x[-1])


def test_no_kidneys_or_adrenals_is_a_no_op(real_labels):
    truth, affine = _reoriented(real_labels, ("R", "A", "S"))
    truth[np.isin(truth, (RIGHT_KIDNEY, LEFT_KIDNEY, RIGHT_ADRENAL, LEFT_ADRENAL))] = 0
    split = split_left_right(truth, affine)
    assert split is not truth
    np.testing.assert_array_equal(split, truth)
    empty = np.zeros((4, 5, 6), np.uint8)
    np.testing.assert_array_equal(split_left_right(empty, np.eye(4)), empty)


def _tilted_phantom() -> tuple[np.ndarray, np.ndarray]:
    """RAS 1 mm map whose aorta runs diagonally: world x = 20 + z (x index = 20 + k)."""
    labels = np.zeros((60, 20, 30), np.uint8)
    for k in range(30):
        labels[20 + k - 1:20 + k + 1, 8:10, k] = AORTA
    return labels, np.eye(4)


def test_single_component_is_split_per_voxel_along_the_tilted_line():
    labels, affine = _tilted_phantom()
    labels[5:55, 2:5, 0:30] = RIGHT_KIDNEY  # one bridged component spanning both sides at every height
    split = split_left_right(labels, affine)
    kidney = labels == RIGHT_KIDNEY
    i = np.arange(60)[:, None, None]
    k = np.arange(30)[None, None, :]
    line_x = 20 + k - 0.5  # mean x of the two aorta voxels in each slice
    np.testing.assert_array_equal(split == LEFT_KIDNEY, kidney & (i < line_x))
    np.testing.assert_array_equal(split == RIGHT_KIDNEY, kidney & (i > line_x))


def test_two_largest_are_assigned_whole_by_centroid():
    labels, affine = _tilted_phantom()
    labels[0:22, 12:16, 0:6] = RIGHT_KIDNEY  # left of the line (x < 20..25) except its tip at x 20, 21
    labels[35:50, 12:16, 0:6] = RIGHT_KIDNEY  # right of the line
    labels[0:3, 0:2, 25:28] = RIGHT_KIDNEY  # small island, far left of the line -> per voxel -> left
    split = split_left_right(labels, affine)
    assert np.all(split[0:22, 12:16, 0:6] == LEFT_KIDNEY)  # tip crossing the line stays with its component
    assert np.all(split[35:50, 12:16, 0:6] == RIGHT_KIDNEY)
    assert np.all(split[0:3, 0:2, 25:28] == LEFT_KIDNEY)


def test_two_largest_on_the_same_side_fall_back_to_per_voxel():
    labels, affine = _tilted_phantom()
    labels[30:40, 12:16, 0:4] = RIGHT_KIDNEY  # both right of the line, centroids x 34.5 and 52.5
    labels[45:60, 12:16, 0:4] = RIGHT_KIDNEY
    labels[18:26, 12:16, 10:12] = RIGHT_ADRENAL  # line at z 10..11 is x 29.5..30.5: all left
    split = split_left_right(labels, affine)
    assert np.all(split[30:40, 12:16, 0:4] == RIGHT_KIDNEY)
    assert np.all(split[45:60, 12:16, 0:4] == RIGHT_KIDNEY)
    assert np.all(split[18:26, 12:16, 10:12] == LEFT_ADRENAL)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        split_left_right(np.zeros((4, 4), np.uint8), np.eye(4))
    with pytest.raises(ValueError):
        split_left_right(np.zeros((4, 4, 4), np.uint8), np.eye(3))
