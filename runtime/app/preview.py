"""``--preview``: a PNG with axial, coronal and sagittal slices through the segmented organs, labels overlaid in the
registry's colours (:mod:`flare.runtime.foundation.labels`, the one colour source), matplotlib's Agg canvas (no
display, no pyplot global state).

Each view shows the slice where the segmented organs have their largest cross-section in that view (the image
centre when nothing was segmented), so the organs are in the picture rather than wherever the volume's centre falls.
Slices are taken in the closest canonical RAS grid and shown in radiological convention (patient right on the
viewer's left, anterior and superior up), with millimetre extents so that anisotropic voxels keep their shape, and
orientation letters (R/L, A/P, S/I) on the edges of each view. The legend names every label present.
"""

from __future__ import annotations

import io

import numpy as np
from flare.runtime.foundation.labels import LABELS, NUM_FLARE_IDS

__all__ = ["PREVIEW_WINDOW_HU", "render_preview"]

#: CT window of the preview (soft-tissue abdomen: level 40, width 400)
PREVIEW_WINDOW_HU = (-160.0, 240.0)
_ALPHA = 0.45
_DPI = 100


#: orientation letters of each view: (left edge, right edge, top edge, bottom edge), radiological convention
ORIENTATION_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"),
                       "sagittal": ("A", "P", "S", "I")}


def slice_indices(labels_ras: np.ndarray) -> tuple[int, int, int]:
    """(x, y, z) voxel indices of the sagittal, coronal and axial slices with the most labelled voxels (the organs'
    largest cross-section in each view); the image centre when nothing was segmented. From the mask's projections
    on each axis (no coordinate arrays: little memory on a full-size CT)."""
    fg = labels_ras > 0
    if not fg.any():
        return tuple(s // 2 for s in labels_ras.shape)  # type: ignore[return-value]
    return tuple(int(np.argmax(fg.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)))
                 for axis in range(3))  # type: ignore[return-value]


def _views(ct: np.ndarray, lab: np.ndarray, spacing: tuple[float, float, float], c: tuple[int, int, int]
           ) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, float, float, float]]]:
    """(title, CT slice, label slice, extent) with rows going up (origin lower) and columns already flipped."""
    sx, sy, sz = spacing
    nx, ny, nz = ct.shape
    return [
        # axial: rows = anterior (y), columns = x flipped (patient right on the left)
        ("axial", ct[::-1, :, c[2]].T, lab[::-1, :, c[2]].T, (0, nx * sx, 0, ny * sy)),
        # coronal: rows = superior (z), columns = x flipped
        ("coronal", ct[::-1, c[1], :].T, lab[::-1, c[1], :].T, (0, nx * sx, 0, nz * sz)),
        # sagittal: rows = superior (z), columns = y flipped (anterior on the left)
        ("sagittal", ct[c[0], ::-1, :].T, lab[c[0], ::-1, :].T, (0, ny * sy, 0, nz * sz)),
    ]


def _letters(ax: object, letters: tuple[str, str, str, str]) -> None:
    """Orientation letters at the middle of the left, right, top and bottom edges of a view."""
    style = {"color": "yellow", "fontsize": 16, "fontweight": "bold", "transform": ax.transAxes}  # type: ignore[attr-defined]
    for (x, y, ha, va), letter in zip(((0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"),
                                       (0.5, 0.99, "center", "top"), (0.5, 0.01, "center", "bottom")), letters):
        ax.text(x, y, letter, ha=ha, va=va, **style)  # type: ignore[attr-defined]


def render_preview(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, title: str = "") -> bytes:
    """PNG bytes: three overlays through the labels' centre, a legend of the labels present; >= 512 px high."""
    from flare.runtime.image.model import Reorientation
    from flare.runtime.ops.geometry import spacing_from_affine
    from flare.runtime.ops.stats import label_counts
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    reo = Reorientation.from_affine(affine)
    ct, lab = reo.apply(image), reo.apply(labels)
    spacing = spacing_from_affine(reo.ras_affine(affine, image.shape))
    colours = np.zeros((NUM_FLARE_IDS, 4), dtype=np.float32)
    for entry in LABELS[1:]:
        colours[entry.id] = (*(v / 255.0 for v in entry.color), _ALPHA)
    lo, hi = PREVIEW_WINDOW_HU
    fig = Figure(figsize=(15.36, 7.2), dpi=_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"wspace": 0.04})
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.2)
    for ax, (name, ct_sl, lab_sl, extent) in zip(axes, _views(ct, lab, spacing, slice_indices(lab))):
        ax.imshow(np.clip(ct_sl.astype(np.float32), lo, hi), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                  extent=extent, interpolation="nearest")
        ax.imshow(colours[np.minimum(lab_sl, NUM_FLARE_IDS - 1)], origin="lower", extent=extent,
                  interpolation="nearest")
        ax.set_title(name, color="white", fontsize=14)
        ax.set_axis_off()
        _letters(ax, ORIENTATION_LETTERS[name])
    counts = label_counts(np.asarray(labels, dtype=np.uint8))
    present = [entry for entry in LABELS[1:] if counts[entry.id]]
    if present:
        handles = [Patch(color=tuple(v / 255.0 for v in e.color), label=f"{e.id} {e.name}") for e in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=12, frameon=False,
                   labelcolor="white", handlelength=1.6, columnspacing=1.4)
    if title:
        fig.suptitle(title, color="white", fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="black")
    return buf.getvalue()

