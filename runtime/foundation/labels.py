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
    "merge_left_right",
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
    color: tuple[int, int, int]
    #: an organ the post-processing cleans of outliers: the paper's rule keeps its largest run of z slices
    #: (``Z_RUN_IDS``, the default), the strict rules its largest 3-D connected component (``LARGEST_COMPONENT_IDS``)
    largest_component: bool
    snomed: Snomed | None = None  # None for background


BACKGROUND, LIVER, RIGHT_KIDNEY, SPLEEN, PANCREAS, AORTA, IVC = 0, 1, 2, 3, 4, 5, 6
RIGHT_ADRENAL, LEFT_ADRENAL, GALLBLADDER, ESOPHAGUS, STOMACH, DUODENUM = 7, 8, 9, 10, 11, 12
LEFT_KIDNEY, TUMOR = 13, 14

LABELS: tuple[Label, ...] = (
    Label(0, "background", "bg", (0, 0, 0), False),
    Label(1, "liver", "liver", (221, 130, 101), True, Snomed(("10200004", "Liver"))),
    Label(2, "right kidney", "kidney_r", (185, 102, 83), True, Snomed(("64033007", "Kidney"), laterality=RIGHT)),
    Label(3, "spleen", "spleen", (157, 108, 162), True, Snomed(("78961009", "Spleen"))),
    Label(4, "pancreas", "pancreas", (249, 180, 111), True, Snomed(("15776009", "Pancreas"))),
    Label(5, "aorta", "aorta", (224, 97, 76), True, Snomed(("15825003", "Aorta"))),
    Label(6, "inferior vena cava", "ivc", (0, 151, 206), False, Snomed(("64131007", "Inferior vena cava"))),
    Label(7, "right adrenal gland", "adrenal_r", (244, 214, 49), False,
          Snomed(("23451007", "Adrenal gland"), laterality=RIGHT)),
    Label(8, "left adrenal gland", "adrenal_l", (230, 190, 30), False,
          Snomed(("23451007", "Adrenal gland"), laterality=LEFT)),
    Label(9, "gallbladder", "gallbladder", (139, 150, 98), False, Snomed(("28231008", "Gallbladder"))),
    Label(10, "esophagus", "esophagus", (211, 171, 143), False, Snomed(("32849002", "Esophagus"))),
    Label(11, "stomach", "stomach", (216, 101, 79), False, Snomed(("69695003", "Stomach"))),
    Label(12, "duodenum", "duodenum", (255, 253, 229), False, Snomed(("38848004", "Duodenum"))),
    Label(13, "left kidney", "kidney_l", (205, 122, 103), True, Snomed(("64033007", "Kidney"), laterality=LEFT)),
    Label(14, "tumor", "tumor", (255, 0, 0), False,
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
