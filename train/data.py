"""Datalists and MONAI data pipelines.

A datalist is a MONAI ``dataset.json``: ``training`` entries with ``image``, ``label`` (FLARE ids, possibly
partial) and ``fold``; optionally ``label_full`` (complete truth, phantoms) and a ``testing`` list of held-out cases.
Relative paths are resolved against the datalist's folder.

Preprocessing (cached once per case): LoadImage -> channel first -> Orientation RAS -> Spacing (``spacing_mm``,
bilinear / nearest) -> ScaleIntensityRange(-250..250 HU -> 0..1, clip) -> labels to the 13 merged classes (or the
binary organ union for the locator) -> per-class voxel indices for the crop sampler.
Augmentation per step: pad to the roi -> crops centred on each present class with equal probability -> axial
rotation and scale -> flips -> histogram shift -> contrast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime import labels as L
from flare.runtime.errors import InputError

#: FLARE id -> 1 for the 13 organs, 0 for background and tumour (the locator's organ union)
ORGAN_UNION_LUT = np.array([0] + [1] * 13 + [0], dtype=np.uint8)


def load_datalist(path: str | Path) -> dict[str, Any]:
    """Read a datalist (or ``DIR/dataset.json``) with absolute paths; raises InputError on missing files/keys."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise InputError(path, "datalist does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"cannot parse datalist: {err}") from None
    if not isinstance(doc.get("training"), list) or not doc["training"]:
        raise InputError(path, "datalist has no 'training' entries")
    base = path.parent
    for list_name in ("training", "testing"):
        entries = doc.get(list_name) or []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry:
                raise InputError(path, f"{list_name}[{n}] has no 'image'")
            for key in ("image", "label", "label_full", "label_given"):
                if entry.get(key):
                    p = Path(entry[key])
                    entry[key] = str(p if p.is_absolute() else (base / p).resolve())
                    if not Path(entry[key]).is_file():
                        raise InputError(entry[key], f"file of {list_name}[{n}].{key} does not exist")
        doc[list_name] = entries
    doc["_path"] = str(path)
    return doc


def case_name(entry: dict[str, Any]) -> str:
    name = Path(entry["image"]).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def label_ids(path: str | Path | None) -> set[int]:
    """The FLARE ids present in a label file (empty for no file)."""
    if not path:
        return set()
    import nibabel as nib

    img: Any = nib.load(str(path))
    arr = np.asarray(img.dataobj)
    ids = np.flatnonzero(np.bincount(arr.astype(np.intp).ravel(), minlength=L.NUM_FLARE_IDS))
    return {int(i) for i in ids if i != 0}


def fully_labelled(ids: set[int]) -> bool:
    """All 13 organs present (the paper's definition; tumour is not required)."""
    return set(L.ORGAN_IDS) <= ids


def folds_of(entries: list[dict[str, Any]], fold: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation) entries of ``fold``: validation = entries whose ``fold`` equals it."""
    train = [e for e in entries if int(e.get("fold", -1)) != fold]
    val = [e for e in entries if int(e.get("fold", -1)) == fold]
    return train, val


def _map_labels(lut: np.ndarray):
    import torch

    table = torch.as_tensor(lut)

    def apply(x: Any) -> Any:
        return table[torch.as_tensor(x).long()]

    return apply


def preprocess_transform(eff: dict[str, Any], *, with_label: bool = True, label_key: str = "label",
                         indices: bool = True):
    """Deterministic part: load, RAS, spacing, HU window, label mapping and crop indices (cached per case)."""
    from monai import transforms as T

    keys = ["image", label_key] if with_label else ["image"]
    lo, hi = (float(v) for v in eff["hu_window"])
    union = eff.get("labels") == "organ-union"
    steps: list[Any] = [
        T.LoadImaged(keys=keys, image_only=True),
        T.EnsureChannelFirstd(keys=keys),
        T.Orientationd(keys=keys, axcodes="RAS"),
        T.Spacingd(keys=keys, pixdim=[float(v) for v in eff["spacing_mm"]],
                   mode=["bilinear", "nearest"][: len(keys)]),
        T.ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        T.EnsureTyped(keys="image", dtype=np.float32, track_meta=True),
    ]
    if with_label:
        lut = ORGAN_UNION_LUT if union else L.FLARE_TO_MERGED
        steps.append(T.Lambdad(keys=label_key, func=_map_labels(lut)))
        if indices:
            steps.append(_indices(eff, label_key))
    return T.Compose(steps)


def augment_transform(eff: dict[str, Any]):
    """Random part, applied per step to a cached case; returns ``num_crops`` crops."""
    from monai import transforms as T

    roi = [int(v) for v in eff["roi"]]
    aug = eff["augment"]
    union = eff.get("labels") == "organ-union"
    n = 2 if union else L.NUM_MERGED_CLASSES
    keys = ["image", "label"]
    rot = math.radians(float(aug["rotate_z_deg"]))
    return T.Compose([
        T.SpatialPadd(keys=keys, spatial_size=roi),
        T.RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=roi, num_classes=n,
                                  num_samples=int(eff["train"].get("num_crops", 1)),
                                  indices_key="label_cls_indices", warn=False),
        T.RandAffined(keys=keys, prob=float(aug["prob_affine"]), rotate_range=(0.0, 0.0, rot),
                      scale_range=[float(aug["scale"])] * 3, mode=["bilinear", "nearest"], padding_mode="zeros"),
        *[T.RandFlipd(keys=keys, prob=float(aug["flip_prob"]), spatial_axis=ax) for ax in (0, 1, 2)],
        T.RandHistogramShiftd(keys="image", prob=float(aug["hist_shift_prob"]),
                              num_control_points=(int(aug["hist_shift_points"][0]),
                                                  int(aug["hist_shift_points"][1]))),
        T.RandAdjustContrastd(keys="image", prob=float(aug["contrast_prob"]), gamma=tuple(aug["gamma"])),
        T.DeleteItemsd(keys="label_cls_indices"),
        T.EnsureTyped(keys=keys, track_meta=False),
    ])


def _indices(eff: dict[str, Any], label_key: str):
    from monai import transforms as T

    n = 2 if eff.get("labels") == "organ-union" else L.NUM_MERGED_CLASSES
    return T.ClassesToIndicesd(keys=label_key, num_classes=n, indices_postfix="_cls_indices")


def preprocess(entries: list[dict[str, Any]], eff: dict[str, Any], *, label_key: str = "label",
               indices: bool = True, num_workers: int = 2, progress: Any = None) -> list[dict[str, Any]]:
    """Preprocess (load, resample, normalise) every entry once; the result is what epochs sample from.

    Entries without a label get an all-background label when ``label_key`` is requested.
    """
    from concurrent.futures import ThreadPoolExecutor

    xform = preprocess_transform(eff, with_label=True, label_key=label_key, indices=indices)
    img_only = preprocess_transform(eff, with_label=False)

    def one(entry: dict[str, Any]) -> dict[str, Any]:
        if entry.get(label_key):
            item = xform({"image": entry["image"], label_key: entry[label_key]})
        else:
            item = img_only({"image": entry["image"]})
            item[label_key] = np.zeros(item["image"].shape, np.uint8)
            if indices:
                item = _indices(eff, label_key)(item)
        if label_key != "label":
            item["label"] = item.pop(label_key)
            if indices:
                item["label_cls_indices"] = item.pop(f"{label_key}_cls_indices")
        item["name"] = case_name(entry)
        if progress:
            progress()
        return item

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        return list(pool.map(one, entries))


class AugmentedDataset:
    """A torch map-style dataset: cached case ``i`` through the random augmentation (shallow copy per call)."""

    def __init__(self, items: list[dict[str, Any]], eff: dict[str, Any]) -> None:
        self.items = items
        self.transform = augment_transform(eff)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        item = {k: v for k, v in self.items[i].items() if k in ("image", "label", "label_cls_indices")}
        return self.transform(item)
