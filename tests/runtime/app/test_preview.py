"""``--preview`` rendered from the real CT and its reference labels, checked on the PNG itself: every present
label's colour is in the legend, orientation letters are drawn on each view, and the views go through the organs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import data_path

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def rendered() -> tuple[np.ndarray, np.ndarray]:
    from flare.runtime.app.preview import render_preview
    from flare.runtime.image.nifti import read_image
    from matplotlib.image import imread

    ct = read_image(data_path("ts_abdomen_ct_3mm.nii.gz"))
    labels = np.asarray(read_image(data_path("ts_abdomen_labels_flare_ids.nii.gz")).data, dtype=np.uint8)
    png = render_preview(ct.data, labels, ct.affine, title="abdomen")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return (imread(io.BytesIO(png))[..., :3] * 255).round().astype(np.int16), labels


def _has_colour(img: np.ndarray, rgb: tuple[int, int, int], min_pixels: int = 30) -> bool:
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= 1).sum()) >= min_pixels


def test_legend_shows_each_present_label_colour(rendered) -> None:
    from flare.runtime.foundation.labels import LABELS

    img, labels = rendered
    present = {int(v) for v in np.unique(labels) if v}
    assert len(present) == 12
    legend = img[int(img.shape[0] * 0.8):]  # the legend lies in the bottom fifth
    for lab in LABELS[1:]:
        assert _has_colour(legend, lab.color) == (lab.id in present), lab.name


def test_orientation_letters_on_every_view(rendered) -> None:
    img, _ = rendered
    yellow = (np.abs(img - np.array([255, 255, 0])).max(axis=-1) <= 40)
    width = img.shape[1]
    for third in range(3):  # axial, coronal, sagittal: letters at the left and right edges of each view
        part = yellow[:, third * width // 3:(third + 1) * width // 3]
        cols = np.nonzero(part.any(axis=0))[0]
        assert cols.size, third
        assert cols.min() < part.shape[1] * 0.2 and cols.max() > part.shape[1] * 0.8, (third, cols.min(), cols.max())


def test_slices_go_through_the_largest_organ_cross_sections() -> None:
    from flare.runtime.app.preview import ORIENTATION_LETTERS, slice_indices

    labels = np.zeros((40, 30, 20), np.uint8)
    labels[5:10, 20:25, 2:4] = 1  # small, off-centre
    labels[30:38, 3:12, 12:19] = 3  # the bulk
    x, y, z = slice_indices(labels)
    assert 30 <= x < 38 and 3 <= y < 12 and 12 <= z < 19
    assert slice_indices(np.zeros((8, 6, 4), np.uint8)) == (4, 3, 2)
    assert ORIENTATION_LETTERS["axial"] == ("R", "L", "A", "P")
