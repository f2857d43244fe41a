"""MONAI data pipelines that stream: host memory depends on workers × prefetch × crop, not on the number of cases.

Preprocessing (deterministic, cached per case): LoadImage -> channel first -> Orientation RAS -> resample to
``spacing_mm`` (MONAI Resize, trilinear / nearest-exact, the runtime's grid) -> ``hu_window`` -> 0..1, clipped,
in place -> crop centres per class of the **15 FLARE ids** (background, 13 organs, tumour; the binary organ union
for the locator), at most ``data.max_samples_per_class`` of them (MONAI ``ClassesToIndicesd(max_samples_per_class=
...)``: evenly spaced over the class's voxels; without the cap the background alone needs 8 bytes per voxel).
Augmentation per step: pad to the roi -> crops centred on each present class with equal probability (the paper's
"equal probability from one of the 15 regions": each kidney and each adrenal gland is its own region, so they get
the weight of one class each, not half of a merged one; with ``augment.lesion_paste_prob``, labelled tumours
are first copied to new places, :mod:`flare.train.lesions`) -> rotation in the axial plane and scaling
(``augment.scale_axes``: ``"xy"`` as the paper, ``"xyz"`` the old behaviour) -> flips -> histogram shift ->
contrast -> labels to the 13 merged training classes (left/right merged).

``data.cache`` chooses where the preprocessed cases live (measured in ``train/results/RESULTS.md``):

- ``disk`` (default): MONAI ``PersistentDataset`` under ``data.cache_dir`` (default ``OUT/cache``), one file per case
  and preprocessing setting, shared by all folds, stages and ranks; every step reads one case back.
- ``memory``: MONAI ``CacheDataset`` (``data.cache_rate`` of the cases in RAM, per training run).
- ``none``: preprocess on every step (slow; no storage).

Validation cases are preprocessed the same way but keep their labels in FLARE ids (``label_space="flare"``) so that
Dice can be reported per class after the left/right split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.errors import InputError
from monai.transforms import MapTransform  # this module is only imported by torch-side code

_LOG = logging.getLogger("flare.train")
#: FLARE id -> 1 for the 13 organs, 0 for background and tumour (the locator's organ union)
ORGAN_UNION_LUT = np.array([0] + [1] * 13 + [0], dtype=np.uint8)
IDENTITY_LUT = np.arange(L.NUM_FLARE_IDS, dtype=np.uint8)
CACHE_MODES = ("disk", "memory", "none")
LABEL_SPACES = ("flare", "merged")
DATA_DEFAULTS: dict[str, Any] = {"cache": "disk", "cache_dir": None, "cache_rate": 1.0,
                                 "max_samples_per_class": 10000, "prep_workers": 2, "background_min_hu": None}


def data_config(eff: dict[str, Any]) -> dict[str, Any]:
    """``eff["data"]`` over the defaults, checked."""
    cfg = {**DATA_DEFAULTS, **(eff.get("data") or {})}
    if cfg["cache"] not in CACHE_MODES:
        raise InputError("config", f"data.cache must be one of {', '.join(CACHE_MODES)}, not {cfg['cache']!r}")
    b = cfg["background_min_hu"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))):
        raise InputError("config", f"data.background_min_hu must be a number of HU or null, not {b!r}")
    return cfg


def _label_lut(eff: dict[str, Any], label_space: str) -> np.ndarray:
    """Label map applied in preprocessing: the organ union for the locator; for the folds FLARE ids as they are
    (``"flare"``: validation, and training, whose crop centres are drawn over the 15 FLARE classes before
    :func:`augment_transform` merges left and right) or the 13 merged classes (``"merged"``)."""
    if eff.get("labels") == "organ-union":
        return ORGAN_UNION_LUT
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space must be one of {LABEL_SPACES}, not {label_space!r}")
    return L.FLARE_TO_MERGED if label_space == "merged" else IDENTITY_LUT


def sampling_classes(eff: dict[str, Any]) -> int:
    """Classes the crop centres are drawn over: 2 for the locator, the 15 FLARE ids (0..14) for the folds."""
    return 2 if eff.get("labels") == "organ-union" else L.NUM_FLARE_IDS


def crop_ratios(eff: dict[str, Any]) -> list[float] | None:
    """``train.crop_ratios``: relative chance of a crop centre in each sampled class (background first), or None for
    equal chances (the paper's "equal probability from one of the 15 regions")."""
    r = eff["train"].get("crop_ratios")
    if r is None:
        return None
    n = sampling_classes(eff)
    if len(r) != n or any(float(v) < 0 for v in r) or not any(float(v) > 0 for v in r):
        raise InputError("config", f"train.crop_ratios must be {n} non-negative numbers (one per sampled class, "
                                   f"not all 0), not {r!r}")
    return [float(v) for v in r]


def _source(x: Any) -> str | None:
    """The file a MONAI-loaded tensor came from (None if unknown)."""
    meta = getattr(x, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return None if name is None else str(name)


def _map_labels(lut: np.ndarray, check: bool = False):
    """Label ids -> ``lut[id]`` as uint8, slab by slab (a whole-volume int64 index would cost 8 bytes a voxel);
    ``check``: first the values' range (ids outside the table would index past it; once per case, at preprocessing)."""
    import torch

    table = torch.as_tensor(lut)

    def apply(x: Any) -> Any:
        if check:
            from .datalist import check_label_values

            check_label_values(_source(x) or "label", np.asarray(x), whole=False)
        x = torch.as_tensor(x)
        out = torch.empty(x.shape, dtype=torch.uint8)
        for z in range(0, x.shape[-1], 16):
            out[..., z:z + 16] = table[x[..., z:z + 16].long()]
        return out

    return apply


def _scale_intensity(lo: float, hi: float):
    """``hu_window`` -> 0..1 with clipping, in place (ScaleIntensityRanged made two volume-sized temporaries)."""

    def apply(x: Any) -> Any:
        return x.sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)

    return apply


def _keep_affine(item: dict[str, Any]) -> dict[str, Any]:
    """Store the image's voxel -> world matrix as a plain tensor (``affine``): the disk cache keeps no metadata."""
    return {**item, "affine": item["image"].affine.clone()}


class SameGridd(MapTransform):
    """Image and label on one voxel grid, checked after both are turned to RAS (``Orientationd``: a label stored
    in another axis order or direction is fine): the same shape, or the case is refused (the label would be
    resampled along and train the network on misaligned voxels). Grids more than half a voxel apart in the world
    (the headers disagree on the origin or spacing) only warn, as nnU-Net does: training pairs voxels by index."""

    def __init__(self) -> None:
        super().__init__(["image", "label"])

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        img, lab = data["image"], data["label"]
        where = _source(lab) or "label"
        if lab.ndim != 4:
            raise InputError(where, f"a label map must be one 3-D volume; this one has shape {tuple(lab.shape[1:])}")
        if tuple(img.shape[1:]) != tuple(lab.shape[1:]):
            raise InputError(where, f"label grid {tuple(lab.shape[1:])} differs from its image's "
                                    f"{tuple(img.shape[1:])} ({_source(img)})")
        corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[1] - 1) for j in (0, img.shape[2] - 1)
                            for k in (0, img.shape[3] - 1)]).T
        a, b = (np.asarray(t.affine, dtype=np.float64) for t in (img, lab))
        apart = (a @ corners - b @ corners)[:3]
        in_voxels = np.abs(np.linalg.solve(a[:3, :3], apart)).max()
        if in_voxels > 0.5:
            _LOG.warning("%s: label lies %.1f mm (%.1f voxels) away from its image's grid (%s): the headers place them "
                         "differently; trained voxel for voxel", where,
                         float(np.linalg.norm(apart, axis=0).max()), float(in_voxels), _source(img))
        return data


class ResampleToSpacingd(MapTransform):
    """Resample to ``spacing`` mm with MONAI ``Resize`` (trilinear for the image, nearest-exact for a label) in the
    runtime's align-centres grid convention and output size (``flare.runtime.ops.resample.output_shape``), so training
    sees the grid ``flare-run`` builds. ``Spacingd`` would build a float sampling grid of 12-24 bytes per output
    voxel (5.6 GB peak for a 313x313x875 case at 1.5 mm); ``Resize`` needs only the output."""

    def __init__(self, keys: list[str], spacing: list[float]) -> None:
        super().__init__(keys)
        self.spacing = spacing

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        from flare.runtime.ops.resample import output_shape
        from monai.transforms import Resize

        d = dict(data)
        img = d[str(self.keys[0])]
        shape = output_shape(img.shape[1:], [float(v) for v in img.pixdim], self.spacing)
        for key in map(str, self.keys):
            mode = "trilinear" if key == "image" else "nearest-exact"
            d[key] = Resize(shape, mode=mode, anti_aliasing=False)(d[key])
        return d


class BodyBackgroundd(MapTransform):
    """Background crop centres only where the image is above ``min_hu`` (inside the body), replacing the
    background entry of ``label_cls_indices`` (MONAI ``map_classes_to_indices`` on background alone, same cap).

    The paper draws background centres anywhere; most background is air around the patient, and a crop there teaches
    little. Measured on phantoms (issue 20): crops centred on organs almost never show the pelvis, and the network
    then labels pelvic bone as spleen on scans that reach it (``data.background_min_hu``; ``null`` = the paper).
    Folds only: the locator's two classes keep the paper's sampling."""

    def __init__(self, min_hu: float, hu_window: tuple[float, float], max_samples: int) -> None:
        super().__init__(["label"])
        lo, hi = hu_window
        if not lo <= float(min_hu) < hi:
            raise InputError("config", f"data.background_min_hu must lie in hu_window [{lo:g}, {hi:g}), not {min_hu!r}")
        self.threshold = (float(min_hu) - lo) / (hi - lo)  # in the 0..1 scaled image
        self.max_samples = max_samples

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        from monai.transforms.utils import map_classes_to_indices

        d = dict(data)
        body_bg = map_classes_to_indices(d["label"], num_classes=1, image=d["image"],
                                         image_threshold=self.threshold, max_samples_per_class=self.max_samples)[0]
        if len(body_bg):
            d["label_cls_indices"] = [body_bg, *d["label_cls_indices"][1:]]
        return d


def preprocess_transform(eff: dict[str, Any], *, with_label: bool = True, label_space: str = "flare",
                         indices: bool = True):
    """Deterministic part: load, RAS, spacing, HU window, label mapping and (capped) crop centres per class."""
    from monai import transforms as T

    keys = ["image", "label"] if with_label else ["image"]
    lo, hi = (float(v) for v in eff["hu_window"])
    steps: list[Any] = [
        T.LoadImaged(keys=keys, image_only=True),
        T.EnsureChannelFirstd(keys=keys),
        T.Orientationd(keys=keys, axcodes="RAS"),
        *([SameGridd()] if with_label else []),
        ResampleToSpacingd(keys=keys, spacing=[float(v) for v in eff["spacing_mm"]]),
        T.EnsureTyped(keys="image", dtype=np.float32, track_meta=True),
        T.Lambdad(keys="image", func=_scale_intensity(lo, hi)),
        T.Lambda(_keep_affine),
    ]
    if with_label:
        steps.append(T.Lambdad(keys="label", func=_map_labels(_label_lut(eff, label_space), check=True)))
        if indices:
            dc = data_config(eff)
            cap = int(dc["max_samples_per_class"])
            steps.append(T.ClassesToIndicesd(keys="label", num_classes=sampling_classes(eff),
                                             indices_postfix="_cls_indices", max_samples_per_class=cap))
            if dc["background_min_hu"] is not None and sampling_classes(eff) > 2:
                steps.append(BodyBackgroundd(float(dc["background_min_hu"]), (lo, hi), cap))
    return T.Compose(steps)


def augment_transform(eff: dict[str, Any]):
    """Random part, applied per step to a cached case; returns ``num_crops`` crops."""
    from monai import transforms as T

    roi = [int(v) for v in eff["roi"]]
    aug = eff["augment"]
    keys = ["image", "label"]
    rot = math.radians(float(aug["rotate_z_deg"]))
    scale = float(aug["scale"])
    axes = str(aug.get("scale_axes", "xyz"))
    if axes not in ("xy", "xyz"):
        raise InputError("config", f"augment.scale_axes must be 'xy' or 'xyz', not {axes!r}")
    return T.Compose([
        *lesion_paste(eff),
        T.SpatialPadd(keys=keys, spatial_size=roi),
        T.RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=roi, num_classes=sampling_classes(eff),
                                  ratios=crop_ratios(eff), num_samples=int(eff["train"].get("num_crops", 1)),
                                  indices_key="label_cls_indices", warn=False),
        T.RandAffined(keys=keys, prob=float(aug["prob_affine"]), rotate_range=(0.0, 0.0, rot),
                      scale_range=[scale, scale, scale if axes == "xyz" else 0.0], mode=["bilinear", "nearest"],
                      padding_mode="zeros"),
        *[T.RandFlipd(keys=keys, prob=float(aug["flip_prob"]), spatial_axis=ax) for ax in (0, 1, 2)],
        T.RandHistogramShiftd(keys="image", prob=float(aug["hist_shift_prob"]),
                              num_control_points=(int(aug["hist_shift_points"][0]),
                                                  int(aug["hist_shift_points"][1]))),
        T.RandAdjustContrastd(keys="image", prob=float(aug["contrast_prob"]), gamma=tuple(aug["gamma"])),
        T.DeleteItemsd(keys=["label_cls_indices", "affine"]),
        T.EnsureTyped(keys=keys, track_meta=False),
        *([] if eff.get("labels") == "organ-union" else
          [T.Lambdad(keys="label", func=_map_labels(L.FLARE_TO_MERGED))]),  # FLARE ids -> 13 merged classes
    ])


def lesion_paste(eff: dict[str, Any]) -> list[Any]:
    """``augment.lesion_paste_prob`` > 0 (folds only): :class:`flare.train.lesions.RandLesionPasted` before the crop;
    absent at 0 (the paper's default), so the other transforms' random streams stay as they were."""
    aug = eff["augment"]
    prob = aug.get("lesion_paste_prob", 0.0)
    if eff.get("labels") == "organ-union" or not prob:
        return []
    from .lesions import DEFAULT_HOSTS, RandLesionPasted

    return [RandLesionPasted(prob, aug.get("lesion_hosts") or DEFAULT_HOSTS, scale=aug.get("lesion_scale"),
                             contrast=aug.get("lesion_contrast"))]


def _slim(entries: list[dict[str, Any]], label_key: str | None) -> list[dict[str, Any]]:
    """What a dataset item (and its disk-cache hash) is made of: the image and the label file only."""
    out = []
    for e in entries:
        item = {"image": e["image"]}
        if label_key:
            if not e.get(label_key):
                raise InputError(e["image"], f"case has no {label_key}")
            item["label"] = e[label_key]
        out.append(item)
    return out


def cache_folder(eff: dict[str, Any], root: str | Path, kind: str) -> Path:
    """``root/<kind>-<hash of the preprocessing settings>``: a new folder whenever the preprocessing changes."""
    dc = data_config(eff)
    key = {"spacing_mm": eff["spacing_mm"], "hu_window": eff["hu_window"], "labels": eff.get("labels"),
           "kind": kind, "max_samples_per_class": dc["max_samples_per_class"], "version": 3}
    if dc["background_min_hu"] is not None:  # absent when unset: existing caches stay valid
        key["background_min_hu"] = dc["background_min_hu"]
    return Path(root) / f"{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


def _dataset(items: list[dict[str, Any]], transform: Any, eff: dict[str, Any], cache_root: str | Path | None,
             kind: str):
    from monai.data import CacheDataset, Dataset, PersistentDataset

    dc = data_config(eff)
    if dc["cache"] == "disk" and cache_root is not None:
        folder = cache_folder(eff, cache_root, kind)
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=folder)
    if dc["cache"] == "memory":
        return CacheDataset(items, transform, cache_rate=float(dc["cache_rate"]),
                            num_workers=int(dc["prep_workers"]), progress=False)
    return Dataset(items, transform)


def train_dataset(entries: list[dict[str, Any]], eff: dict[str, Any], cache_root: str | Path | None = None,
                  label_key: str = "label"):
    """Training dataset: cached preprocessing + random augmentation; item ``i`` is a list of ``num_crops`` crops."""
    from monai import transforms as T

    xform = T.Compose([*preprocess_transform(eff).transforms, *augment_transform(eff).transforms])
    return _dataset(_slim(entries, label_key), xform, eff, cache_root, "train")


def eval_dataset(entries: list[dict[str, Any]], eff: dict[str, Any], cache_root: str | Path | None = None,
                 label_key: str | None = "label", label_space: str = "flare"):
    """Whole preprocessed cases (image and, with ``label_key``, the label in ``label_space``), one per item."""
    xform = preprocess_transform(eff, with_label=label_key is not None, label_space=label_space, indices=False)
    kind = f"eval-{label_space}" if label_key else "image"
    return _dataset(_slim(entries, label_key), xform, eff, cache_root, kind)


def warm_cache(ds: Any, indices: list[int], workers: int = 2, progress: Any = None) -> int:
    """Preprocess into a ``PersistentDataset``'s folder the ``indices`` that are not there yet (threads); returns
    how many were computed. Ranks warm disjoint shards so no two processes write the same file."""
    from concurrent.futures import ThreadPoolExecutor

    from monai.data import PersistentDataset

    if not isinstance(ds, PersistentDataset) or ds.cache_dir is None:
        return 0
    todo = [i for i in indices
            if not (ds.cache_dir / f"{ds.hash_func(ds.data[i]).decode('utf-8')}{ds.transform_hash}.pt").is_file()]

    def one(i: int) -> None:
        ds._cachecheck(ds.data[i])  # MONAI's own compute-and-store of one item
        if progress:
            progress()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, todo))
    return len(todo)


def preprocess(entries: list[dict[str, Any]], eff: dict[str, Any], *, label_key: str = "label",
               label_space: str = "merged") -> list[dict[str, Any]]:
    """Preprocess whole cases into memory (tests and small experiments; training streams instead)."""
    ds = eval_dataset(entries, {**eff, "data": {**data_config(eff), "cache": "none"}}, None, label_key, label_space)
    return [ds[i] for i in range(len(ds))]
