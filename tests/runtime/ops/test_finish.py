"""flare.runtime.ops.finish: the label stage on bounding boxes gives the whole-map order's labels, in place."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from flare.runtime.foundation.labels import FLARE_TO_MERGED, MERGED_TO_FLARE, TUMOR, merged_to_flare
from flare.runtime.ops.components import label_boxes, relabel_in_boxes
from flare.runtime.ops.finish import finish_labels
from flare.runtime.ops.lr_split import split_left_right
from flare.runtime.ops.postprocessing import MODES, postprocess


def _maps() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Merged-class maps from the real label map: as is, with stray blobs and small tumors, and noisy."""
    img = nib.load(data_path("ts_abdomen_labels_flare_ids.nii.gz"))
    merged = FLARE_TO_MERGED[np.asarray(img.dataobj).astype(np.intp)]
    out = {"real": merged}
    stray = np.pad(merged, ((0, 0), (0, 0), (0, 20)))
    for i, k in enumerate((1, 2, 3, 4, 5)):
        stray[5 + 6 * i:8 + 6 * i, 5:8, 40:42] = k  # beyond every organ's z range
    stray[100:103, 90:93, 10:12] = FLARE_TO_MERGED[TUMOR]
    out["outliers"] = stray
    rng = np.random.default_rng(0)
    noisy = merged.copy()
    pick = rng.random(noisy.shape) < 0.02
    noisy[pick] = rng.integers(1, len(MERGED_TO_FLARE), int(pick.sum()), dtype=np.uint8)
    out["noisy"] = noisy
    return {name: (m, img.affine) for name, m in out.items()}


@pytest.mark.parametrize("mode", MODES)
def test_finish_on_boxes_equals_the_whole_map_order(mode: str) -> None:
    for (name, (merged, affine)), min_tumor in zip(_maps().items(), (2, 1000, 2000)):  # tumors kept / removed
        spacing = (3.0, 3.0, 3.0)
        ref = postprocess(split_left_right(merged_to_flare(merged), affine), spacing, mode=mode,
                          min_tumor_voxels=min_tumor)
        work = merged.copy()
        got = finish_labels(work, affine, spacing, mode=mode, min_tumor_voxels=min_tumor)
        assert got is work, "in place"
        np.testing.assert_array_equal(got, ref, err_msg=f"{name} {mode}")
    assert len(np.unique(ref)) > 10


def test_relabel_in_boxes_maps_each_voxel_once() -> None:
    merged = _maps()["noisy"][0].copy()
    ref = merged_to_flare(merged)
    boxes = relabel_in_boxes(merged, MERGED_TO_FLARE, label_boxes(merged, len(MERGED_TO_FLARE) - 1))
    np.testing.assert_array_equal(merged, ref)
    assert boxes[TUMOR] is not None and boxes[8] is None  # merged class 12 -> 14; nothing maps to 8
    with pytest.raises(ValueError, match="lut"):
        relabel_in_boxes(merged, np.array([0, 0], np.uint8), [None, None])
