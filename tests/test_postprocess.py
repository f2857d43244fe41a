"""flare.runtime.postprocess: small-tumor removal, largest components, the 1-D z pass."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from flare.runtime.labels import (
    AORTA,
    LARGEST_COMPONENT_IDS,
    LEFT_ADRENAL,
    LEFT_KIDNEY,
    LIVER,
    RIGHT_ADRENAL,
    RIGHT_KIDNEY,
    SPLEEN,
    STOMACH,
    TUMOR,
)
from flare.runtime.lr_split import split_left_right
from flare.runtime.postprocess import keep_largest_z_run, postprocess
from scipy import ndimage

SHAPE = (40, 40, 80)


def _blank() -> np.ndarray:
    return np.zeros(SHAPE, np.uint8)


def test_tumor_threshold_is_exact_at_1mm():
    labels = _blank()
    labels[0:9, 0:11, 0] = TUMOR  # 99 voxels
    labels[20:30, 20:30, 0] = TUMOR  # 100 voxels
    out = postprocess(labels, (1.0, 1.0, 1.0), z_pass=False)
    assert np.count_nonzero(out[0:9, 0:11, 0]) == 0
    assert np.all(out[20:30, 20:30, 0] == TUMOR)


def test_tumor_threshold_scales_with_voxel_volume():
    labels = _blank()
    labels[0:7, 0:7, 0] = TUMOR  # 49 voxels of 2 mm³ = 98 mm³ -> removed
    labels[20:30, 20:25, 0] = TUMOR  # 50 voxels of 2 mm³ = 100 mm³ -> kept
    out = postprocess(labels, (2.0, 1.0, 1.0), z_pass=False)
    assert np.count_nonzero(out == TUMOR) == 50
    assert np.all(out[20:30, 20:25, 0] == TUMOR)
    # threshold 0 keeps everything
    np.testing.assert_array_equal(postprocess(labels, (2.0, 1.0, 1.0), min_tumor_voxels=0, z_pass=False), labels)


def test_components_are_26_connected():
    labels = _blank()
    labels[0:5, 0:5, 0:2] = TUMOR  # 50 voxels
    labels[5:10, 5:10, 2:4] = TUMOR  # 50 voxels touching the first by one corner only -> one 100-voxel tumor
    out = postprocess(labels, (1.0, 1.0, 1.0), z_pass=False)
    np.testing.assert_array_equal(out, labels)


def test_largest_component_per_listed_organ():
    labels = _blank()
    labels[0:10, 0:10, 0:10] = LIVER  # 1000 voxels: kept
    labels[20:25, 20:25, 0:10] = LIVER  # 250: removed
    labels[30:35, 0:5, 0:5] = RIGHT_KIDNEY
    labels[30:33, 10:13, 0:5] = RIGHT_KIDNEY  # smaller right-kidney piece: removed
    labels[0:4, 30:34, 0:5] = LEFT_KIDNEY  # left kidney is its own class: kept
    labels[0:3, 20:23, 12:15] = STOMACH
    labels[10:12, 20:22, 12:15] = STOMACH  # stomach is not in the list: both pieces kept
    labels[30:31, 30:31, 12:13] = TUMOR  # 1 voxel tumor: removed
    out = postprocess(labels, (1.0, 1.0, 1.0), z_pass=False)
    expected = labels.copy()
    expected[20:25, 20:25, 0:10] = 0
    expected[30:33, 10:13, 0:5] = 0
    expected[30, 30, 12] = 0
    np.testing.assert_array_equal(out, expected)
    # not listed -> untouched
    np.testing.assert_array_equal(postprocess(labels, (1.0, 1.0, 1.0), largest_component=(), z_pass=False)
                                  [20:25, 20:25, 0:10], LIVER)


def _z_phantom() -> np.ndarray:
    labels = _blank()
    labels[0:20, 0:20, 10:40] = LIVER
    labels[25:30, 0:5, 35:45] = STOMACH  # touches the main run (z 10..44)
    labels[25:30, 25:30, 75:78] = SPLEEN  # island 30 slices above the main run: removed
    labels[0:3, 30:33, 0:3] = STOMACH  # island below: removed
    labels[30:36, 30:36, 70:76] = TUMOR  # far-away tumor (216 voxels): kept
    labels[10:12, 10:12, 44] = TUMOR  # tumor inside the run
    return labels


def test_z_pass_keeps_only_the_main_run_and_never_touches_tumor():
    labels = _z_phantom()
    out = postprocess(labels, (1.0, 1.0, 1.0), min_tumor_voxels=0, largest_component=())
    expected = labels.copy()
    expected[25:30, 25:30, 75:78] = 0
    expected[0:3, 30:33, 0:3] = 0
    np.testing.assert_array_equal(out, expected)
    # switched off: nothing removed
    np.testing.assert_array_equal(postprocess(labels, (1.0, 1.0, 1.0), min_tumor_voxels=0, largest_component=(),
                                              z_pass=False), labels)


def test_z_pass_picks_the_run_with_most_organ_voxels_and_follows_z_axis():
    labels = _blank()
    labels[0:2, 0:2, 0:30] = AORTA  # long thin run: 120 voxels
    labels[10:30, 10:30, 40:45] = LIVER  # short thick run: 2000 voxels -> kept
    moved = np.ascontiguousarray(np.moveaxis(labels, 2, 0))
    removed = keep_largest_z_run(moved, z_axis=0)
    assert removed == 120
    assert np.count_nonzero(moved == AORTA) == 0 and np.count_nonzero(moved == LIVER) == 2000


def test_copy_and_in_place_and_dtype():
    labels = _z_phantom()
    before = labels.copy()
    out = postprocess(labels, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(labels, before)  # default: input untouched
    assert out.dtype == np.uint8
    same = postprocess(labels, (1.0, 1.0, 1.0), copy=False)
    assert same is labels
    np.testing.assert_array_equal(labels, out)
    with pytest.raises(ValueError):
        postprocess(labels.astype(np.int16), (1.0, 1.0, 1.0))


def _to_1mm_nearest(data: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Nearest resampling on the project's 'align centres' grid with plain numpy indexing."""
    index = []
    for n_in, sp in zip(data.shape, spacing):
        n_out = max(1, round(n_in * sp))
        index.append(np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1))
    return data[np.ix_(*index)]


def test_real_label_map_at_1mm_keeps_every_organ():
    img = nib.load(data_path("ts_abdomen_labels_flare_ids.nii.gz"))
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    data = np.asarray(img.dataobj).astype(np.uint8)
    truth = _to_1mm_nearest(data, spacing)
    scale = np.array(data.shape) / np.array(truth.shape)
    grid = np.eye(4)
    grid[:3, :3] = np.diag(scale)
    grid[:3, 3] = (scale - 1) / 2  # 'align centres' half-voxel shift
    affine = img.affine @ grid
    merged = truth.copy()
    merged[merged == LEFT_KIDNEY] = RIGHT_KIDNEY
    merged[merged == LEFT_ADRENAL] = RIGHT_ADRENAL
    out = postprocess(split_left_right(merged, affine), (1.0, 1.0, 1.0))
    before = np.bincount(truth.ravel(), minlength=15)
    after = np.bincount(out.ravel(), minlength=15)
    for label_id in np.flatnonzero(before[1:]) + 1:
        if label_id in LARGEST_COMPONENT_IDS:
            # exactly the largest 26-connected component survives (scipy as the independent oracle); this
            # TotalSegmentator pancreas is in two halves, so it loses one -- the paper's rule, on purpose
            ids, _ = ndimage.label(truth == label_id, structure=np.ones((3, 3, 3), bool))
            assert after[label_id] == np.bincount(ids.ravel())[1:].max(), label_id
            assert after[label_id] >= 0.5 * before[label_id], label_id
        else:
            assert after[label_id] >= 0.98 * before[label_id], (label_id, before[label_id], after[label_id])
    assert np.all(out[out != 0] == truth[out != 0])  # only removals, no relabelling errors
