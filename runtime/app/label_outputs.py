"""The label outputs TotalSegmentator users expect, from the registry (:mod:`flare.runtime.foundation.labels`):

- ``--roi-subset``: :func:`keep_only` sets every other label to 0;
- ``--masks DIR``: :func:`write_masks` writes one binary uint8 NIfTI per label, named like TotalSegmentator's
  (``liver.nii.gz``, ``kidney_right.nii.gz``, ...; all labels, or the ``--roi-subset`` ones, empty masks included);
- ``--label-table``: the label names and colours for viewers, beside the label map: ``STEM.ctbl``, a 3D Slicer colour
  table (Slicer's "Color table file" text format: load it with Add Data, then pick it as the labelmap's colour
  table, or tick "LabelMap" and choose it when loading) and ``STEM.itksnap.txt``, an ITK-SNAP label description
  file (Segmentation > Import Label Descriptions). NIfTI itself has no standard place for label names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flare.runtime.foundation.labels import LABELS, NUM_FLARE_IDS

__all__ = ["itksnap_label_descriptions", "keep_only", "mask_paths", "slicer_color_table", "write_label_tables",
           "write_masks"]


def keep_only(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """``labels`` with every id not in ``ids`` set to 0 (in place; returns it)."""
    lut = np.zeros(max(NUM_FLARE_IDS, int(labels.max(initial=0)) + 1), dtype=labels.dtype)
    lut[list(ids)] = list(ids)
    np.take(lut, labels, out=labels)
    return labels


def mask_paths(folder: Path, ids: Sequence[int] | None = None) -> dict[int, Path]:
    """The mask file of each label id in ``ids`` (default: all 14): ``folder/<TotalSegmentator name>.nii.gz``."""
    return {label_id: folder / f"{LABELS[label_id].file}.nii.gz" for label_id in ids or range(1, NUM_FLARE_IDS)}


def write_masks(folder: Path, labels: np.ndarray, like: object, ids: Sequence[int] | None = None) -> list[Path]:
    """One ``<TotalSegmentator name>.nii.gz`` per label id in ``ids`` (default: all 14) in ``folder`` (which exists),
    each a 0/1 uint8 map in the input's space, written atomically; returns the paths."""
    from flare.runtime.image.nifti import write_labels

    written = []
    for label_id, path in mask_paths(folder, ids).items():
        write_labels(path, (labels == label_id).view(np.uint8), like=like)  # type: ignore[arg-type]
        written.append(path)
    return written


def slicer_color_table() -> str:
    """3D Slicer colour table text (``.ctbl``): ``id name R G B A`` per label, spaces in names as underscores."""
    rows = ["# Color table file flare.ctbl", f"# {NUM_FLARE_IDS} values"]
    rows += [f"{lab.id} {lab.file if lab.id else 'Background'} {' '.join(map(str, lab.color))} {255 if lab.id else 0}"
             for lab in LABELS]
    return "\n".join(rows) + "\n"


def itksnap_label_descriptions() -> str:
    """ITK-SNAP label description file: ``IDX R G B A VIS MSH "LABEL"`` per label (0 is ITK-SNAP's Clear Label)."""
    rows = ["################################################", "# ITK-SnAP Label Description File",
            "# File format: ", "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
            "################################################"]
    for lab in LABELS:
        name = "Clear Label" if lab.id == 0 else lab.name
        alpha, vis = ("0", "0") if lab.id == 0 else ("1", "1")
        rows.append(f"{lab.id:5d} {lab.color[0]:5d} {lab.color[1]:4d} {lab.color[2]:4d} {alpha:>8}  {vis}  {vis}"
                    f"    \"{name}\"")
    return "\n".join(rows) + "\n"


def write_label_tables(paths: Sequence[Path]) -> None:
    """Write the Slicer colour table and the ITK-SNAP label descriptions (``paths`` from
    :func:`flare.runtime.app.plan.table_paths`), atomically."""
    from flare.runtime.foundation.atomic import write_text_atomic

    for path in paths:
        write_text_atomic(path, slicer_color_table() if path.suffix == ".ctbl" else itksnap_label_descriptions())
