"""``--preview``: a PNG with axial, coronal and sagittal slices through the segmented organs' centre, labels overlaid
in the registry's colours (runtime/foundation/labels.py), matplotlib's Agg canvas (no display, no pyplot global state).

Slices are taken in the closest canonical RAS grid and shown in radiological convention (patient right on the
viewer's left, anterior and superior up), with millimetre extents so that anisotropic voxels keep their shape.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from flare.runtime.foundation.labels import LABELS, NUM_FLARE_IDS

__all__ = ["PREVIEW_WINDOW_HU", "render_preview", "write_preview"]

#: CT window of the preview (soft-tissue abdomen: level 40, width 400)
PREVIEW_WINDOW_HU = (-160.0, 240.0)
_ALPHA = 0.45
_DPI = 100


def _centre(labels_ras: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the centre of mass of all labels (the image centre when nothing was segmented), from the
    mask's projections on each axis (no coordinate arrays: little memory on a full-size CT)."""
    fg = labels_ras > 0
    total = int(fg.sum())
    if not total:
        return tuple(s // 2 for s in labels_ras.shape)  # type: ignore[return-value]
    centre = []
    for axis in range(3):
        profile = fg.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        centre.append(round(float(profile @ np.arange(profile.size)) / total))
    return tuple(centre)  # type: ignore[return-value]


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


def render_preview(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, title: str = "") -> bytes:
    """PNG bytes: three overlays through the labels' centre, a legend of the labels present; >= 512 px high."""
    from flare.runtime.image.nifti import Reorientation
    from flare.runtime.ops.geometry import spacing_from_affine
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
    fig = Figure(figsize=(15.36, 6.0), dpi=_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"wspace": 0.02})
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.1)
    for ax, (name, ct_sl, lab_sl, extent) in zip(axes, _views(ct, lab, spacing, _centre(lab))):
        ax.imshow(np.clip(ct_sl.astype(np.float32), lo, hi), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                  extent=extent, interpolation="nearest")
        ax.imshow(colours[np.minimum(lab_sl, NUM_FLARE_IDS - 1)], origin="lower", extent=extent,
                  interpolation="nearest")
        ax.set_title(name, color="white", fontsize=11)
        ax.set_axis_off()
    counts = np.bincount(np.asarray(labels, dtype=np.uint8).ravel(order="K"), minlength=NUM_FLARE_IDS)
    present = [entry for entry in LABELS[1:] if counts[entry.id]]
    if present:
        handles = [Patch(color=(e.color[0] / 255.0, e.color[1] / 255.0, e.color[2] / 255.0), label=f"{e.id} {e.name}")
                   for e in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False,
                   labelcolor="white")
    if title:
        fig.suptitle(title, color="white", fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="black")
    return buf.getvalue()


def write_preview(path: str | Path, png: bytes) -> None:
    """Write PNG bytes from :func:`render_preview` atomically."""
    from flare.runtime.foundation.atomic import write_bytes_atomic

    write_bytes_atomic(path, png)
