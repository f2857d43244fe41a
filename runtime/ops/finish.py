"""The pipeline's last label stage on the host, on organ bounding boxes: merged classes → FLARE ids, the
left/right split, post-processing — in place, after one scan for the bounding box of every class.

:func:`finish_labels` gives the same map as ``postprocess(split_left_right(merged_to_flare(merged), affine), ...)``
(tested), but after the one ``scipy.ndimage.find_objects`` scan each step reads only the boxes of the ids it
treats: the relabelling of merged classes 8..12, the aorta (reference line), each merged kidney/adrenal pair,
the tumor and each z-rule organ. On the device path the ensemble hands over a box per class (from the tiles it
decided), so not even that scan runs on the host. Absent classes cost nothing; no volume-sized temporary is made (the old order
made an int64 index copy of the map, a copy for the split and a boolean map per id).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flare.runtime.foundation.labels import LEFT_RIGHT_PAIRS, MERGED_TO_FLARE, TUMOR
from flare.runtime.ops.components import Box, label_boxes, relabel_in_boxes
from flare.runtime.ops.lr_split import split_left_right
from flare.runtime.ops.postprocessing import DEFAULT_MODE, postprocess

__all__ = ["finish_labels"]


def finish_labels(merged: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float], *,
                  mode: str = DEFAULT_MODE, min_tumor_voxels: int = 100, organs: Sequence[int] | None = None,
                  z_pass: bool = True, boxes: Sequence[Box | None] | None = None) -> np.ndarray:
    """FLARE ids of the merged-class map ``merged`` (uint8, changed **in place** and returned): relabelled, split
    left/right in world coordinates (``affine``) and post-processed (``mode``, see
    :func:`flare.runtime.ops.postprocessing.postprocess`), reading only bounding boxes after one scan — or none:
    ``boxes`` gives each merged class a box (supersets are fine; the device ensemble reports them per tile)."""
    if merged.dtype != np.uint8 or merged.ndim != 3:
        raise ValueError(f"merged labels must be a 3-D uint8 map, got {merged.dtype} {merged.shape}")
    if boxes is None:
        boxes = label_boxes(merged, len(MERGED_TO_FLARE) - 1)
    flare_boxes = relabel_in_boxes(merged, MERGED_TO_FLARE, list(boxes))
    labels = split_left_right(merged, affine, boxes=flare_boxes, copy=False)
    flare_boxes += [None] * max(0, TUMOR + 1 - len(flare_boxes))
    for right, left in LEFT_RIGHT_PAIRS:  # the split's left ids lie inside the merged pair's box
        flare_boxes[left] = flare_boxes[right]
    return postprocess(labels, spacing, mode=mode, min_tumor_voxels=min_tumor_voxels, organs=organs, z_pass=z_pass,
                       copy=False, boxes=flare_boxes)
