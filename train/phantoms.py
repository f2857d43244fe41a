"""Deterministic synthetic abdominal CT phantoms for demos, tests and benchmarks.

Every case is drawn from its own random stream ``default_rng([seed, index])``, so case ``i`` is identical whatever
the number of cases. A case is built in a RAS+ patient frame in millimetres (+x = patient's right, +y = anterior,
+z = head; the origin sits near the renal hilum): air, a body outline that changes with z (trunk, neck, head, two
thighs), subcutaneous fat, abdominal wall muscle, visceral fat with bowel loops and gas, spine and paraspinal muscles,
lungs and heart above the diaphragm, pelvis, bladder and femurs below, skull and brain above the neck, the 13 FLARE
organs and tumours (in organs, in the retroperitoneum, in the lungs). HU values follow a per-case contrast phase;
smooth texture and white noise follow the label subset's "site" (the way multi-site data differ).

The output folder holds ``imagesTr/``, ``labelsTr/`` (what a user would have: only the subset's classes),
``labelsFull/`` (complete truth) and ``dataset.json`` (MONAI datalist: ``training`` entries with ``image``,
``label``, ``label_full``, ``fold``, ``subset``; held-out cases in ``testing``).

``size`` is the in-plane matrix. At 512 spacings are realistic (0.6-1 mm in plane, 1-5 mm slices); smaller sizes
keep the anatomy and field of view and coarsen the in-plane spacing by ``512 / size`` (slices are never thinner
than the in-plane spacing), which makes phantoms for tests and CPU demos small and fast.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.atomic import atomic_path, write_text_atomic

#: FLARE23-like label subsets: the FLARE ids a case of the subset has labels for
SUBSETS: dict[str, tuple[int, ...]] = {
    "all": tuple(range(1, 15)),
    "organs5_tumor": (L.LIVER, L.RIGHT_KIDNEY, L.LEFT_KIDNEY, L.SPLEEN, L.PANCREAS, L.TUMOR),
    "tumor": (L.TUMOR,),
    "unlabelled": (),
}
#: subset per case index: a seed-shuffled repeating cycle of these (4 full, 3 five-organ, 1 tumor-only, 2 unlabelled)
SUBSET_CYCLE: tuple[str, ...] = ("all",) * 4 + ("organs5_tumor",) * 3 + ("tumor",) + ("unlabelled",) * 2
#: per-subset acquisition ("site"): white-noise sigma range (HU), contrast-phase range, texture amplitude (HU)
SITES: dict[str, dict[str, tuple[float, float]]] = {
    "all": {"noise": (8.0, 14.0), "contrast": (0.7, 1.0), "texture": (8.0, 12.0)},
    "organs5_tumor": {"noise": (15.0, 25.0), "contrast": (0.4, 0.9), "texture": (10.0, 16.0)},
    "tumor": {"noise": (20.0, 30.0), "contrast": (0.9, 1.3), "texture": (12.0, 18.0)},
    "unlabelled": {"noise": (10.0, 35.0), "contrast": (0.0, 1.1), "texture": (6.0, 18.0)},
}
#: z extents (mm) of the scan: name, probability, (z0, z1) centre values
EXTENTS: tuple[tuple[str, float, tuple[float, float]], ...] = (
    ("abdomen", 0.5, (-130.0, 190.0)),
    ("abdomen-pelvis", 0.2, (-400.0, 180.0)),
    ("chest-abdomen-pelvis", 0.2, (-380.0, 400.0)),
    ("head-to-thigh", 0.1, (-600.0, 700.0)),
)
#: voxel orientations the files are written in (the arrays are built in RAS)
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "PRS", "RPI")
SLICE_THICKNESS_MM: tuple[float, ...] = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0)


@dataclass
class Grid:
    """An axis-aligned RAS voxel grid: world = origin + index * spacing."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self, lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Index slices of the sub-box [lo, hi] (mm, clipped) and the broadcastable world coordinates of its voxels."""
        sl, coords = [], []
        for d in range(3):
            a, s, n = self.origin[d], self.spacing[d], self.shape[d]
            i0 = 0 if lo is None else int(np.clip(np.floor((lo[d] - a) / s), 0, n))
            i1 = n if hi is None else int(np.clip(np.ceil((hi[d] - a) / s) + 1, 0, n))
            sl.append(slice(i0, i1))
            c = (a + s * np.arange(i0, i1)).astype(np.float32)
            coords.append(c.reshape([-1 if k == d else 1 for k in range(3)]))
        return tuple(sl), coords

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff


class Canvas:
    """HU image and FLARE label map being painted; later shapes overwrite earlier ones."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, shape: Shape, hu: float | None, label: int | None = None, *, only_label: int | None = None) -> int:
        """Paint ``shape``: set HU (if given) and label (if given); ``only_label`` restricts to voxels of that label.

        Returns the number of voxels painted.
        """
        sl, xyz = self.grid.axes(*shape.bbox)
        if any(s.stop <= s.start for s in sl):
            return 0
        mask = shape.inside(*xyz)
        mask = np.broadcast_to(mask, tuple(s.stop - s.start for s in sl))
        if only_label is not None:
            mask = mask & (self.label[sl] == only_label)
        if hu is not None:
            self.hu[sl][mask] = hu
        if label is not None:
            self.label[sl][mask] = label
        return int(mask.sum())


@dataclass
class Shape:
    """A solid given by an inside test on world coordinates and a bounding box (mm)."""

    inside: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    bbox: tuple[np.ndarray, np.ndarray]


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0) -> np.ndarray:
    """Rotation by ``pitch_deg`` about x (tilt towards head/feet), then ``yaw_deg`` about z (in the axial plane)."""
    a, b = np.radians(yaw_deg), np.radians(pitch_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    return rz @ rx


def ellipsoid(center: Any, radii: Any, rot: np.ndarray | None = None) -> Shape:
    """Ellipsoid with semi-axes ``radii`` along the columns of ``rot`` (axis-aligned without it)."""
    c, r = np.asarray(center, float), np.asarray(radii, float)
    if rot is None:
        def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0

        return Shape(inside, (c - r, c + r))
    m = np.asarray(rot, float).T / r[:, None]  # world offset -> unit-sphere coordinates

    def inside_rot(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = (x - c[0], y - c[1], z - c[2])
        return sum((m[i, 0] * d[0] + m[i, 1] * d[1] + m[i, 2] * d[2]) ** 2 for i in range(3)) <= 1.0

    half = np.sqrt(((np.asarray(rot, float) * r[None, :]) ** 2).sum(1))  # bounding box of the rotated ellipsoid
    return Shape(inside_rot, (c - half, c + half))


def capsule(p0: Any, p1: Any, radius: float) -> Shape:
    """All points within ``radius`` of the segment p0-p1."""
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    ab = b - a
    denom = float(ab @ ab) or 1.0

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom, 0.0, 1.0)
        return (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2 <= radius**2

    return Shape(inside, (np.minimum(a, b) - radius, np.maximum(a, b) + radius))


def elliptic_cylinder(cx: float, cy: float, rx: float, ry: float, z0: float, z1: float) -> Shape:
    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0) & (z >= z0) & (z <= z1)

    return Shape(inside, (np.array([cx - rx, cy - ry, z0]), np.array([cx + rx, cy + ry, z1])))


# --------------------------------------------------------------------------------------------------------------------
# one case


@dataclass
class Case:
    """A generated phantom in RAS: HU image, complete FLARE labels, grid and its acquisition parameters."""

    hu: np.ndarray
    label_full: np.ndarray
    grid: Grid
    subset: str
    params: dict[str, Any]


def _body_outline(can: Canvas, a: float, b: float, shrink: float, hu: float, label: int | None = None) -> None:
    """Trunk ellipse (a, b) with neck, head and thighs, shrunk by ``shrink`` mm, painted with ``hu``."""
    z_lo, z_hi = can.grid.origin[2], can.grid.origin[2] + can.grid.spacing[2] * (can.grid.shape[2] - 1)
    shapes = [elliptic_cylinder(0.0, 0.0, a - shrink, b - shrink, max(z_lo, -440.0), min(z_hi, 430.0))]
    if z_hi > 430.0:
        shapes.append(elliptic_cylinder(0.0, -10.0, 55.0 - shrink, 50.0 - shrink, 430.0, 530.0))
        shapes.append(ellipsoid((0.0, 0.0, 620.0), (75.0 - shrink, 95.0 - shrink, 110.0 - shrink)))
    if z_lo < -440.0:
        for side in (1.0, -1.0):
            shapes.append(elliptic_cylinder(side * a * 0.5, 0.0, 0.45 * a - shrink, 0.6 * b - shrink, z_lo, -440.0))
    for s in shapes:
        can.paint(s, hu, label)


def _organs(can: Canvas, rng: np.random.Generator, s: float, b: float, c: float) -> dict[str, Any]:
    """Paint the 13 FLARE organs; returns, for tumour placement, each host organ's centre, radii and tissue HU.

    Each case varies the organs' size (±20 % per axis), position (a shared shift of the viscera along z of up to
    ±25 mm, as the diaphragm's height varies, plus ~12 mm per organ), orientation (solid organs and kidneys turned
    up to ~25° in the axial plane and tilted) and the liver's second lobe, so that no template fits every case."""
    shift = np.array([0.0, 0.0, rng.uniform(-25.0, 25.0)])

    def j(v: tuple[float, float, float], sd: float = 12.0) -> np.ndarray:
        return np.asarray(v) * s + shift + rng.normal(0.0, sd, 3)

    def r(v: tuple[float, float, float]) -> np.ndarray:
        return np.asarray(v) * s * rng.uniform(0.8, 1.2, 3)

    def turn(yaw: float, pitch: float = 0.0) -> np.ndarray:
        return rotation(rng.uniform(-yaw, yaw), rng.uniform(-pitch, pitch))

    spine_y = -b + 45.0 * s
    ctr: dict[str, Any] = {}
    liver_c, liver_r = j((55.0, 5.0, 95.0)), r((75.0, 85.0, 75.0))
    liver_hu = 60.0 + 50.0 * c
    can.paint(ellipsoid(liver_c, liver_r, turn(15.0, 8.0)), liver_hu, L.LIVER)
    lobe = np.array([rng.uniform(-65.0, -35.0), rng.uniform(10.0, 40.0), rng.uniform(0.0, 20.0)]) * s
    can.paint(ellipsoid(liver_c + lobe, liver_r * rng.uniform(0.45, 0.7, 3), turn(30.0)), liver_hu, L.LIVER)
    ctr["liver"] = (liver_c, liver_r, liver_hu)
    gb_c = liver_c + np.array([10.0, 45.0, -45.0]) * s + rng.normal(0.0, 6.0, 3)
    can.paint(ellipsoid(gb_c, r((15.0, 15.0, 30.0)), turn(30.0, 20.0)), 10.0, L.GALLBLADDER)
    spleen_c, spleen_r = j((-85.0, -30.0, 85.0)), r((25.0, 45.0, 50.0))
    spleen_hu = 50.0 + 70.0 * c
    can.paint(ellipsoid(spleen_c, spleen_r, turn(25.0, 15.0)), spleen_hu, L.SPLEEN)
    ctr["spleen"] = (spleen_c, spleen_r, spleen_hu)
    for side, lid, z in ((1.0, L.RIGHT_KIDNEY, 10.0), (-1.0, L.LEFT_KIDNEY, 25.0)):
        kc, kr = j((side * 60.0, -b / s + 95.0, z), 7.0), r((28.0, 25.0, 50.0))
        rot = rotation(side * rng.uniform(0.0, 25.0), rng.uniform(-15.0, 15.0))
        cortex_hu = 40.0 + 150.0 * c
        can.paint(ellipsoid(kc, kr, rot), cortex_hu, lid)  # cortex
        can.paint(ellipsoid(kc - [side * 6.0, 0, 0], kr * 0.55, rot), 35.0 + 80.0 * c, lid)  # medulla / pelvis
        ctr["kidney_r" if side > 0 else "kidney_l"] = (kc, kr, cortex_hu)
    for side, lid, z in ((1.0, L.RIGHT_ADRENAL, 75.0), (-1.0, L.LEFT_ADRENAL, 68.0)):
        can.paint(ellipsoid(j((side * 38.0, -b / s + 100.0, z), 4.0), r((8.0, 5.0, 16.0)), turn(30.0, 15.0)),
                  30.0 + 30.0 * c, lid)
    ax, ivx = -12.0 * s + rng.normal(0, 4), 22.0 * s + rng.normal(0, 4)
    vy = spine_y + 35.0 * s
    bend = rng.normal(0.0, 6.0, 2)  # vessels are not straight lines
    can.paint(capsule((ax + bend[0], vy, -110.0), (ax, vy, 60.0), 11.0 * s), 40.0 + 220.0 * c, L.AORTA)
    can.paint(capsule((ax, vy, 60.0), (ax - bend[1], vy + bend[1], 260.0), 11.0 * s), 40.0 + 220.0 * c, L.AORTA)
    can.paint(capsule((ivx + bend[1], vy + 3.0, -110.0), (ivx, vy + 3.0, 130.0), 11.0 * s * rng.uniform(0.8, 1.2)),
              40.0 + 110.0 * c, L.IVC)
    can.paint(capsule((ax + 4.0, vy + 12.0, 120.0), (ax + 4.0 + rng.normal(0, 5), vy + 2.0, 330.0), 8.0 * s), 40.0,
              L.ESOPHAGUS)
    p0, p1 = j((30.0, 0.0, 30.0), 7.0), j((-75.0, -15.0, 50.0), 7.0)
    pr = 12.0 * s * rng.uniform(0.8, 1.2)
    pancreas_hu = 40.0 + 60.0 * c
    can.paint(capsule(p0, p1, pr), pancreas_hu, L.PANCREAS)
    ctr["pancreas"] = ((p0 + p1) / 2, np.array([abs(p1[0] - p0[0]) / 2, pr, pr]), pancreas_hu)
    d = [p0 + np.array([18.0, 15.0, 25.0]) * s, p0 + np.array([25.0, 10.0, -15.0]) * s + rng.normal(0, 5, 3),
         p0 + np.array([-20.0, 0.0, -30.0]) * s + rng.normal(0, 5, 3)]
    for q0, q1 in itertools.pairwise(d):
        can.paint(capsule(q0, q1, 10.0 * s), 30.0 + 40.0 * c, L.DUODENUM)
    st_c, st_r, st_rot = j((-50.0, 25.0, 110.0)), r((45.0, 35.0, 45.0)), turn(20.0, 15.0)
    wall_hu = 40.0 + 40.0 * c
    can.paint(ellipsoid(st_c, st_r, st_rot), wall_hu, L.STOMACH)  # wall
    can.paint(ellipsoid(st_c, st_r - 5.0 * s, st_rot), 15.0, L.STOMACH)  # content
    can.paint(ellipsoid(st_c + [0, 0, st_r[2] * 0.6], st_r * [0.6, 0.6, 0.35]), -900.0, L.STOMACH,
              only_label=L.STOMACH)  # gas cap
    ctr["stomach"] = (st_c, st_r, wall_hu)
    ctr["aorta_x"] = ax
    return ctr


def _background_anatomy(can: Canvas, rng: np.random.Generator, a: float, b: float, s: float, c: float) -> None:
    """Body, fat, muscle, bowel, bones, lungs, heart, pelvis and head (all label 0)."""
    fat = rng.uniform(12.0, 35.0)
    _body_outline(can, a, b, 0.0, -100.0)
    _body_outline(can, a, b, fat, 50.0)  # abdominal wall muscle
    _body_outline(can, a, b, fat + 10.0, -90.0)  # visceral fat
    for _ in range(40):  # bowel loops with some gas
        cz = rng.uniform(-250.0, 120.0)
        centre = (rng.uniform(-0.6, 0.6) * a, rng.uniform(-0.2, 0.7) * b, cz)
        can.paint(ellipsoid(centre, rng.uniform(10.0, 22.0, 3) * s), rng.uniform(20.0, 45.0) + 20.0 * c)
        if rng.random() < 0.4:
            can.paint(ellipsoid(centre, rng.uniform(3.0, 8.0, 3) * s), -900.0)
    spine_y = -b + 45.0 * s
    can.paint(elliptic_cylinder(0.0, spine_y, 20.0 * s, 17.0 * s, -420.0, 470.0), 700.0)  # cortex
    can.paint(elliptic_cylinder(0.0, spine_y, 16.0 * s, 13.0 * s, -420.0, 470.0), 250.0)  # cancellous
    can.paint(elliptic_cylinder(0.0, spine_y - 30.0 * s, 5.0 * s, 14.0 * s, -420.0, 470.0), 600.0)  # processes
    for side in (1.0, -1.0):
        can.paint(elliptic_cylinder(side * 35.0 * s, spine_y - 25.0 * s, 22.0 * s, 20.0 * s, -420.0, 430.0), 55.0)
        can.paint(capsule((side * 30.0 * s, spine_y + 5.0, 60.0), (side * 60.0 * s, spine_y + 15.0, -230.0),
                          16.0 * s), 50.0)  # psoas
        can.paint(ellipsoid((side * 80.0 * s, 0.0, 250.0), (55.0 * s, 80.0 * s, 110.0)), -850.0)  # lung
        can.paint(ellipsoid((side * 95.0 * s, -20.0, -190.0), (25.0 * s, 60.0 * s, 60.0)), 450.0)  # iliac wing
        can.paint(ellipsoid((side * 85.0 * s, 0.0, -390.0), (25.0 * s, 25.0 * s, 25.0)), 500.0)  # femoral head
        can.paint(elliptic_cylinder(side * a * 0.5, 0.0, 14.0, 14.0, -800.0, -400.0), 900.0)  # femur
    can.paint(ellipsoid((-15.0, 40.0 * s, 250.0), (55.0 * s, 50.0 * s, 60.0)), 40.0 + 150.0 * c)  # heart
    can.paint(ellipsoid((0.0, 40.0 * s, -320.0), (45.0 * s, 35.0 * s, 40.0)), 10.0)  # bladder
    can.paint(ellipsoid((0.0, 0.0, 620.0), (72.0, 92.0, 107.0)), 900.0)  # skull
    can.paint(ellipsoid((0.0, 0.0, 620.0), (66.0, 86.0, 101.0)), 35.0)  # brain


#: the density masses outside an organ are drawn against (retroperitoneum, lungs)
SOFT_TISSUE_HU = 40.0


def _tumors(can: Canvas, rng: np.random.Generator, ctr: dict[str, Any], b: float, s: float) -> list[dict[str, Any]]:
    """0-3 tumours in organs, the retroperitoneum or (when in view) the lungs; hypo- or hyperdense by 25-60 HU
    against the host organ's tissue, masses in the retroperitoneum and lungs against soft tissue (40 HU), as lesions
    are. (Until 2026-12-05 the density was taken from the voxel at the tumour's centre, which could be stomach gas,
    fat or a neighbouring organ: "tumours" of air density in the stomach, or 13 HU from the liver around them.)"""
    z_lo, z_hi = can.grid.origin[2], can.grid.origin[2] + can.grid.spacing[2] * (can.grid.shape[2] - 1)
    hosts = ["liver", "kidney_r", "kidney_l", "pancreas", "spleen", "stomach", "retroperitoneum"]
    if z_hi > 230.0:
        hosts.append("lung")
    out = []
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
        host = str(rng.choice(hosts))
        if host == "retroperitoneum":
            centre = np.array([rng.uniform(-40, 40) * s, -b + 95.0 * s, rng.uniform(-80.0, 40.0)])
            base = SOFT_TISSUE_HU
        elif host == "lung":
            centre = np.array([rng.choice([-1.0, 1.0]) * 80.0 * s, rng.uniform(-30, 30), rng.uniform(200.0, 300.0)])
            base = SOFT_TISSUE_HU
        else:
            c, r, base = ctr[host]
            centre = c + rng.uniform(-0.5, 0.5, 3) * r
        if not z_lo <= centre[2] <= z_hi:
            continue
        radius = rng.uniform(5.0, 30.0) * (0.5 if host in ("pancreas", "lung") else 1.0)
        hu = float(base + rng.choice([-1.0, 1.0], p=[0.8, 0.2]) * rng.uniform(25.0, 60.0))
        n = can.paint(ellipsoid(centre, radius * rng.uniform(0.7, 1.3, 3)), hu, L.TUMOR)
        if n:
            out.append({"host": host, "radius_mm": round(float(radius), 1), "voxels": n})
    return out


def _grid(rng: np.random.Generator, size: int, a: float, b: float, extent: str | None = None) -> tuple[Grid, str]:
    factor = 512.0 / size
    sxy = float(rng.uniform(0.6, 1.0))
    pick = int(rng.choice(len(EXTENTS), p=[e[1] for e in EXTENTS]))
    if extent is not None:
        names = [e[0] for e in EXTENTS]
        if extent not in names:
            raise ValueError(f"extent must be one of {names}, not {extent!r}")
        pick = names.index(extent)
    name, _, (z0, z1) = EXTENTS[pick]
    z0, z1 = z0 + rng.uniform(-30, 30), z1 + rng.uniform(-30, 30)
    thickness = float(rng.choice(SLICE_THICKNESS_MM))
    if z1 - z0 > 600.0:  # long scans are reconstructed thicker, as in practice
        thickness = max(thickness, 3.0)
    sz = max(thickness, sxy * factor)
    nz = max(8, round((z1 - z0) / sz) + 1)
    n = int(size)
    spacing = (sxy * factor, sxy * factor, sz)
    origin = (-(n - 1) / 2 * spacing[0] + rng.uniform(-10, 10), -(n - 1) / 2 * spacing[1] + rng.uniform(-10, 10), z0)
    return Grid((n, n, nz), spacing, origin), name


def _texture(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth noise (coarse random field, trilinear upsampling) with standard deviation ~ amplitude."""
    from scipy import ndimage

    coarse_shape = tuple(max(2, n // 4) for n in shape)
    coarse = rng.normal(0.0, amplitude, coarse_shape).astype(np.float32)
    return ndimage.zoom(coarse, [n / m for n, m in zip(shape, coarse_shape, strict=True)], order=1,
                        grid_mode=True, mode="nearest")


def make_case(index: int, seed: int = 0, size: int = 512, subset: str | None = None,
              extent: str | None = None) -> Case:
    """Generate phantom ``index`` of the series ``seed`` (RAS arrays; deterministic); ``extent`` forces the scan's
    z extent (a name of :data:`EXTENTS`) instead of drawing it."""
    from scipy import ndimage

    rng = np.random.default_rng([int(seed), int(index)])
    if subset is None:
        cycle = list(SUBSET_CYCLE)
        np.random.default_rng([int(seed), 10**6 + index // len(cycle)]).shuffle(cycle)
        subset = cycle[index % len(cycle)]
    site = SITES[subset]
    s = float(rng.uniform(0.85, 1.05))
    a, b = 150.0 * s, 110.0 * s * rng.uniform(0.9, 1.1)
    grid, extent = _grid(rng, size, a, b, extent)
    fov = grid.spacing[0] * grid.shape[0]
    if 2.0 * a + 20.0 > fov:  # keep the body inside the field of view
        shrink = (fov - 20.0) / (2.0 * a)
        s, a, b = s * shrink, a * shrink, b * shrink
    contrast = float(rng.uniform(*site["contrast"]))
    can = Canvas(grid)
    _background_anatomy(can, rng, a, b, s, contrast)
    ctr = _organs(can, rng, s, b, contrast)
    tumors = _tumors(can, rng, ctr, b, s)
    hu = can.hu
    hu += _texture(grid.shape, rng, float(rng.uniform(*site["texture"]))) * (hu > -500)
    hu = ndimage.gaussian_filter(hu, sigma=0.6, output=np.float32)  # partial volume
    hu += rng.normal(0.0, float(rng.uniform(*site["noise"])), hu.shape).astype(np.float32)
    np.clip(hu, -1024, 3000, out=hu)
    params = {"index": index, "seed": seed, "subset": subset, "extent": extent, "contrast": round(contrast, 3),
              "spacing_mm": [round(v, 4) for v in grid.spacing], "shape": list(grid.shape), "scale": round(s, 3),
              "tumors": tumors}
    return Case(hu, can.label, grid, subset, params)


# --------------------------------------------------------------------------------------------------------------------
# writing


def reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS array + affine -> the same image stored with voxel axes ``axcodes`` (e.g. "LPS")."""
    import nibabel as nib

    xform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                            nib.orientations.axcodes2ornt(tuple(axcodes)))
    out = nib.orientations.apply_orientation(data, xform)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(xform, data.shape)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def keep_subset(label_full: np.ndarray, subset: str) -> np.ndarray:
    """The labels a user of ``subset`` has: classes outside the subset become background."""
    keep = np.zeros(L.NUM_FLARE_IDS, dtype=np.uint8)
    for i in SUBSETS[subset]:
        keep[i] = i
    return keep[label_full]


def write_case(case: Case, out_dir: Path, name: str, orientation: str) -> dict[str, Any]:
    """Write image (int16), partial and full labels in ``orientation``; returns the datalist entry. An
    "unlabelled" case gets no ``label`` (as FLARE's unlabelled cases have no label file), so training leaves it out
    unless asked (``include_unlabelled``); its ``label_full`` is written for scoring."""
    entry: dict[str, Any] = {}
    files = [("image", "imagesTr", np.rint(case.hu).astype(np.int16))]
    if SUBSETS[case.subset]:
        files.append(("label", "labelsTr", keep_subset(case.label_full, case.subset)))
    files.append(("label_full", "labelsFull", case.label_full))
    for key, folder, arr in files:
        data, aff = reorient(arr, case.grid.affine, orientation)
        rel = f"{folder}/{name}.nii.gz"
        _save(out_dir / rel, data, aff)
        entry[key] = rel
    entry.update(subset=case.subset, orientation=orientation)
    return entry


def make_phantoms(out_dir: str | Path, cases: int, seed: int = 0, *, size: int = 512, holdout: int | None = None,
                  folds: int = 5, progress: Callable[[int], None] | None = None,
                  long_every: int = 0) -> dict[str, Any]:
    """Write ``cases`` phantoms and ``dataset.json`` under ``out_dir``; returns the datalist.

    The last ``holdout`` cases (default ``max(1, cases // 10)``; ``holdout == cases``: a test set, no training
    case) go to ``testing`` and never into a fold; the others get folds ``0..folds-1`` round-robin within each
    label subset. ``long_every = n > 0`` makes every n-th case (0, n, 2n, ...) a head-to-thigh scan: organ-like
    tissue far from the abdomen (heart, head, thighs) is where a network's remote false positives appear.
    """
    from flare.runtime.foundation.errors import OutputError

    out = Path(out_dir)
    if not str(out_dir).strip():
        raise OutputError(None, "give an output folder for the phantoms")
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    for sub in ("imagesTr", "labelsTr", "labelsFull"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_hold = min(max(1, cases // 10), cases - 1) if holdout is None else min(int(holdout), cases)
    training: list[dict[str, Any]] = []
    testing: list[dict[str, Any]] = []
    per_subset: dict[str, int] = {}
    for i in range(cases):
        case = make_case(i, seed, size, extent="head-to-thigh" if long_every and i % long_every == 0 else None)
        orientation = ORIENTATIONS[int(np.random.default_rng([seed, i, 7]).integers(len(ORIENTATIONS)))]
        entry = write_case(case, out, f"phantom_{i:04d}", orientation)
        entry["params"] = case.params
        if i >= cases - n_hold:
            testing.append(entry)
        else:
            k = per_subset.get(case.subset, 0)
            per_subset[case.subset] = k + 1
            entry["fold"] = k % folds
            training.append(entry)
        if progress:
            progress(i)
    doc = {"name": "flare-phantoms", "description": f"synthetic abdominal CT phantoms, seed {seed}, size {size}",
           "synthetic": True,
           "labels": {str(lab.id): lab.name for lab in L.LABELS}, "subsets": {k: list(v) for k, v in SUBSETS.items()},
           "seed": seed, "size": size, "training": training, "testing": testing}
    write_text_atomic(out / "dataset.json", json.dumps(doc, indent=1) + "\n")
    return doc
