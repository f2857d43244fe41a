"""The FLARE23 label registry: the single source of label ids, names, merging and post-processing rules.

Everything else (training, the bundle, the runtime, CLI help, statistics) reads this module.

Two label spaces exist:

* **FLARE ids** (0..14) — what users' label files and ``flare-run`` outputs contain.
* **merged training space** (13 classes) — what the networks predict: both kidneys are one class and both
  adrenal glands are one class (the paper's left/right merging). ``MERGED_TO_FLARE`` maps a merged class index to
  the FLARE id that represents it (right kidney 2, right adrenal 7); :func:`flare.runtime.ops.lr_split.split_left_right`
  later relabels the patient-left parts to 13 and 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "AORTA",
    "BACKGROUND",
    "COLOUR_SOURCE",
    "DUODENUM",
    "ESOPHAGUS",
    "FLARE_TO_MERGED",
    "GALLBLADDER",
    "IVC",
    "LABELS",
    "LARGEST_COMPONENT_IDS",
    "LEFT_ADRENAL",
    "LEFT_KIDNEY",
    "LEFT_RIGHT_PAIRS",
    "LIVER",
    "MERGED_TO_FLARE",
    "MERGED_TUMOR",
    "NUM_FLARE_IDS",
    "NUM_MERGED_CLASSES",
    "ORGAN_IDS",
    "PANCREAS",
    "RIGHT_ADRENAL",
    "RIGHT_KIDNEY",
    "SPLEEN",
    "STOMACH",
    "TUMOR",
    "Z_RUN_IDS",
    "Label",
    "Snomed",
    "check_snapshot",
    "delta_e76",
    "label_named",
    "merge_left_right",
    "merged_name",
    "merged_to_flare",
    "name_of",
    "registry_snapshot",
]


#: SNOMED CT (code, meaning) pairs used below (DICOM coding scheme designator "SCT"; as in pydicom's codedict)
ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = ("49755003", "Morphologically Abnormal Structure")
RIGHT = ("24028007", "Right")
LEFT = ("7771000", "Left")


@dataclass(frozen=True)
class Snomed:
    """SNOMED CT coding of a label, as DICOM-SEG's segmented property category / type (/ laterality modifier)."""

    type: tuple[str, str]  # (code, meaning)
    category: tuple[str, str] = ANATOMICAL_STRUCTURE
    laterality: tuple[str, str] | None = None


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    short: str
    #: TotalSegmentator's name of the structure (its mask file is ``<file>.nii.gz``); ``--roi-subset`` takes these
    file: str
    #: preview / DICOM-SEG / colour-table colour (sRGB), see ``COLOUR_SOURCE``
    color: tuple[int, int, int]
    #: an organ the post-processing cleans of outliers: the paper's rule keeps its largest run of z slices
    #: (``Z_RUN_IDS``, the default), the strict rules its largest 3-D connected component (``LARGEST_COMPONENT_IDS``)
    largest_component: bool
    snomed: Snomed | None = None  # None for background


BACKGROUND, LIVER, RIGHT_KIDNEY, SPLEEN, PANCREAS, AORTA, IVC = 0, 1, 2, 3, 4, 5, 6
RIGHT_ADRENAL, LEFT_ADRENAL, GALLBLADDER, ESOPHAGUS, STOMACH, DUODENUM = 7, 8, 9, 10, 11, 12
LEFT_KIDNEY, TUMOR = 13, 14

#: Where the colours come from: 3D Slicer's GenericAnatomyColors (also TotalSegmentator's Slicer terminology) for
#: liver, spleen, inferior vena cava and duodenum; the other organs' Slicer colours are near-identical salmon/brown
#: tones (liver, kidneys, aorta and stomach within a few CIE76 units of each other), so they were moved until every
#: pair of the 14 label colours differs by CIE76 Delta E >= 25 in CIELAB (tested; the smallest pair is ~35): aorta
#: red, kidneys magenta (right) / violet (left), adrenals yellow (right) / lime (left), gallbladder green, tumour cyan.
COLOUR_SOURCE = "3D Slicer GenericAnatomyColors, separated to CIE76 Delta E >= 25"

LABELS: tuple[Label, ...] = (
    Label(0, "background", "bg", "background", (0, 0, 0), False),
    Label(1, "liver", "liver", "liver", (221, 130, 101), True, Snomed(("10200004", "Liver"))),
    Label(2, "right kidney", "kidney_r", "kidney_right", (222, 18, 199), True, Snomed(("64033007", "Kidney"), laterality=RIGHT)),
    Label(3, "spleen", "spleen", "spleen", (157, 108, 162), True, Snomed(("78961009", "Spleen"))),
    Label(4, "pancreas", "pancreas", "pancreas", (245, 203, 127), True, Snomed(("15776009", "Pancreas"))),
    Label(5, "aorta", "aorta", "aorta", (220, 20, 40), True, Snomed(("15825003", "Aorta"))),
    Label(6, "inferior vena cava", "ivc", "inferior_vena_cava", (0, 151, 206), False,
          Snomed(("64131007", "Inferior vena cava"))),
    Label(7, "right adrenal gland", "adrenal_r", "adrenal_gland_right", (244, 214, 49), False,
          Snomed(("23451007", "Adrenal gland"), laterality=RIGHT)),
    Label(8, "left adrenal gland", "adrenal_l", "adrenal_gland_left", (150, 220, 60), False,
          Snomed(("23451007", "Adrenal gland"), laterality=LEFT)),
    Label(9, "gallbladder", "gallbladder", "gallbladder", (30, 130, 60), False, Snomed(("28231008", "Gallbladder"))),
    Label(10, "esophagus", "esophagus", "esophagus", (108, 41, 43), False, Snomed(("32849002", "Esophagus"))),
    Label(11, "stomach", "stomach", "stomach", (254, 139, 240), False, Snomed(("69695003", "Stomach"))),
    Label(12, "duodenum", "duodenum", "duodenum", (255, 253, 229), False, Snomed(("38848004", "Duodenum"))),
    Label(13, "left kidney", "kidney_l", "kidney_left", (90, 60, 200), True,
          Snomed(("64033007", "Kidney"), laterality=LEFT)),
    Label(14, "tumor", "tumor", "tumor", (0, 240, 240), False,
          Snomed(("108369006", "Neoplasm"), category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE)),
)
NUM_FLARE_IDS = len(LABELS)
ORGAN_IDS: tuple[int, ...] = tuple(range(1, 14))
#: (right id, left id) pairs merged for training and split again at inference
LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = ((RIGHT_KIDNEY, LEFT_KIDNEY), (RIGHT_ADRENAL, LEFT_ADRENAL))
#: organs of which the strict post-processing keeps only the largest 3-D connected component (per side for the kidneys)
LARGEST_COMPONENT_IDS: tuple[int, ...] = tuple(lab.id for lab in LABELS if lab.largest_component)
#: organs of which the paper's post-processing (§2.6) keeps only the largest run of consecutive z slices, each on its
#: own: liver, right kidney, spleen, pancreas, aorta, left kidney -- the paper names the same six organs for both rules
Z_RUN_IDS: tuple[int, ...] = LARGEST_COMPONENT_IDS

#: merged class index -> FLARE id (kidneys as 2, adrenals as 7)
MERGED_TO_FLARE = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14], dtype=np.uint8)
NUM_MERGED_CLASSES = len(MERGED_TO_FLARE)
MERGED_TUMOR = NUM_MERGED_CLASSES - 1


def _flare_to_merged() -> np.ndarray:
    lut = np.zeros(NUM_FLARE_IDS, dtype=np.uint8)
    for merged, flare_id in enumerate(MERGED_TO_FLARE):
        lut[flare_id] = merged
    for right, left in LEFT_RIGHT_PAIRS:
        lut[left] = lut[right]
    return lut


#: FLARE id -> merged class index (both kidneys -> 2, both adrenals -> 7)
FLARE_TO_MERGED = _flare_to_merged()


def merge_left_right(flare_labels: np.ndarray) -> np.ndarray:
    """FLARE-id label map -> merged training-space class indices (uint8). Ids above 14 are an error."""
    arr = np.asarray(flare_labels)
    if arr.size and (int(arr.max()) >= NUM_FLARE_IDS or int(arr.min()) < 0):
        raise ValueError(f"label ids must lie in 0..{NUM_FLARE_IDS - 1}, found {int(arr.min())}..{int(arr.max())}")
    return FLARE_TO_MERGED[arr.astype(np.intp, copy=False)]


def merged_to_flare(merged: np.ndarray) -> np.ndarray:
    """Merged class indices -> FLARE ids with both kidneys as 2 and both adrenals as 7 (uint8)."""
    return MERGED_TO_FLARE[np.asarray(merged).astype(np.intp, copy=False)]


def name_of(label_id: int) -> str:
    return LABELS[label_id].name


def merged_name(index: int) -> str:
    """Name of a merged training-space class: its FLARE label's, without the side for a merged pair (``kidney``,
    ``adrenal gland``)."""
    flare_id = int(MERGED_TO_FLARE[index])
    name = name_of(flare_id)
    return name.removeprefix("right ") if any(flare_id == right for right, _ in LEFT_RIGHT_PAIRS) else name


def label_named(name: str) -> Label:
    """The foreground label called ``name``: its TotalSegmentator name (``kidney_left``), short name (``kidney_l``)
    or full name (``left kidney``), case-insensitively; ``KeyError`` (whose message lists the valid names)
    otherwise."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    for lab in LABELS[1:]:
        if key in (lab.file, lab.short, lab.name.replace(" ", "_")):
            return lab
    raise KeyError(f"unknown label {name!r}; valid names: {', '.join(lab.file for lab in LABELS[1:])}")


def srgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """CIELAB (D65) of an 8-bit sRGB colour (for the colour-distance rule of the registry's colours)."""
    lin = [c / 255.0 for c in rgb]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in lin]
    m = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
    white = (0.95047, 1.0, 1.08883)
    xyz = [sum(m[i][j] * lin[j] for j in range(3)) / white[i] for i in range(3)]
    f = [v ** (1 / 3) if v > 216 / 24389 else (24389 / 27 * v + 16) / 116 for v in xyz]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def delta_e76(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """CIE76 colour difference (Euclidean distance in CIELAB) of two sRGB colours."""
    la, lb = srgb_to_lab(a), srgb_to_lab(b)
    return float(sum((x - y) ** 2 for x, y in zip(la, lb)) ** 0.5)


def registry_snapshot() -> dict:
    """JSON-serialisable copy of the registry, stored in every bundle."""
    return {
        "labels": [
            {"id": lab.id, "name": lab.name, "short": lab.short, "color": list(lab.color),
             "largest_component": lab.largest_component}
            for lab in LABELS
        ],
        "merged_to_flare": [int(v) for v in MERGED_TO_FLARE],
        "left_right_pairs": [list(p) for p in LEFT_RIGHT_PAIRS],
        "tumor_id": TUMOR,
    }


def check_snapshot(snapshot: dict) -> None:
    """Raise ValueError when a bundle's label snapshot does not match this registry's ids and merging."""
    ours = registry_snapshot()
    theirs_ids = [(d.get("id"), d.get("name")) for d in snapshot.get("labels", [])]
    ours_ids = [(d["id"], d["name"]) for d in ours["labels"]]
    if theirs_ids != ours_ids:
        raise ValueError("label registry differs from this runtime's FLARE23 registry")
    if snapshot.get("merged_to_flare") != ours["merged_to_flare"]:
        raise ValueError("merged-class map differs from this runtime's (left/right merging)")
