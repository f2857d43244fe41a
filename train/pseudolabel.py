"""Pseudo-labels for partially labelled cases: the stage-1 ensemble fills in only the organ classes a case lacks.

Rules (the paper's): a FLARE organ id absent from a case's label file is "missing"; the ensemble's prediction of a
missing organ is written only into voxels that are background in the given labels, so given labels are never
overwritten; tumour is never pseudo-labelled. The ensemble runs in the training space (RAS, ``spacing_mm``); its
merged classes are split into left/right in world coordinates and mapped back onto the case's original voxel grid
(nearest neighbour), where the merge happens and the file is written with the given label's header.

Not in the paper, off by default: ``pseudolabel.postprocess`` in the config cleans the ensemble's prediction before
the merge with one of the runtime's post-processing rule sets (:mod:`flare.runtime.ops.postprocessing`), in the
training space. ``"strict"`` keeps each listed organ's largest 3-D component and the organ union's z run with most
voxels: on head-to-thigh phantoms a small stage-1 network labels organs in the head, the raw pseudo-labels teach
stage 2 to do the same, and at inference the paper's z-run rule then keeps the false run and deletes the true organ
(train/results/RESULTS.md, issue 20, "remote pseudo-labels"). ``"paper"`` (the z-run rule) keeps the longer false
run and makes pseudo-labels worse there; it is offered for comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.atomic import atomic_path
from flare.runtime.ops.lr_split import split_left_right
from flare.runtime.ops.postprocessing import postprocess

from .config import pseudolabel_postprocess
from .datalist import case_name


def merge_pseudo_labels(given: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """FLARE-id label maps -> ``given`` plus the organs of ``pseudo`` that ``given`` lacks, on its background only."""
    present = np.bincount(given.astype(np.intp).ravel(), minlength=L.NUM_FLARE_IDS) > 0
    missing = np.zeros(256, dtype=bool)
    missing[[i for i in L.ORGAN_IDS if not present[i]]] = True  # organ ids only: tumour is never added
    add = (given == 0) & missing[pseudo.astype(np.intp)]
    out = np.array(given, dtype=np.uint8, copy=True)
    out[add] = pseudo[add]
    return out


def to_original_grid(labels: np.ndarray, affine_src: np.ndarray, shape: tuple[int, ...],
                     affine_dst: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from one voxel grid onto another (same world space)."""
    from scipy import ndimage

    m = np.linalg.inv(affine_src) @ affine_dst  # destination voxel -> source voxel
    return ndimage.affine_transform(labels, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape), order=0,
                                    mode="nearest", output=np.uint8)


def pseudolabel_case(nets: list[Any], item: dict[str, Any], entry: dict[str, Any], eff: dict[str, Any],
                     device: Any, out_path: Path) -> dict[str, Any]:
    """Predict ``item`` (preprocessed image) with the ensemble, clean it as ``pseudolabel.postprocess`` says, merge
    into the entry's given labels, write."""
    import nibabel as nib

    from .engine import segment

    merged = segment(nets, item["image"], eff, device)
    affine_train = np.asarray(item["affine"], dtype=np.float64)
    pseudo_train = split_left_right(L.merged_to_flare(merged), affine_train)
    mode = pseudolabel_postprocess(eff)
    if mode != "none":
        sx, sy, sz = (float(v) for v in eff["spacing_mm"])
        postprocess(pseudo_train, (sx, sy, sz), mode=mode, copy=False)
    ref: Any
    if entry.get("label"):
        ref = nib.load(entry["label"])
        given = np.asarray(ref.dataobj).astype(np.uint8)
    else:
        ref = nib.load(entry["image"])
        given = np.zeros(ref.shape[:3], np.uint8)
    pseudo = to_original_grid(pseudo_train, affine_train, given.shape, ref.affine)
    merged_labels = merge_pseudo_labels(given, pseudo)
    img = nib.Nifti1Image(merged_labels, ref.affine, ref.header)
    img.set_data_dtype(np.uint8)
    with atomic_path(out_path) as tmp:
        nib.save(img, tmp)
    added = sorted(set(np.unique(merged_labels).tolist()) - set(np.unique(given).tolist()))
    return {"case": case_name(entry), "added": [int(a) for a in added], "postprocess": mode}


def pseudolabel_datalist(nets: list[Any], entries: list[dict[str, Any]], eff: dict[str, Any], device: Any,
                         out_dir: str | Path, *, log: Any = None, dist: Any = None) -> list[dict[str, Any]]:
    """Pseudo-label every entry that is not fully labelled; returns the stage-2 entries (labels replaced,
    the original kept as ``label_given``). Fully labelled entries are returned unchanged.

    Streams one case at a time; with ``dist`` each rank labels every ``world``-th case and all ranks get the
    whole result.
    """
    from .data import eval_dataset
    from .datalist import fully_labelled, given_ids
    from .distributed import gather

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [e for e in entries if not fully_labelled(given_ids(e))]
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    mine = todo[rank::world]
    ds = eval_dataset(mine, {**eff, "data": {**eff.get("data", {}), "cache": "none"}}, None, label_key=None)
    done = []
    for n, entry in enumerate(mine):
        path = out_dir / f"{case_name(entry)}.nii.gz"
        info = pseudolabel_case(nets, ds[n], entry, eff, device, path)
        if log:
            log(f"pseudo-label {info['case']} ({n + 1}/{len(mine)} on this rank, "
                f"post-processing {info['postprocess']}): added FLARE ids {info['added']}")
        done.append((entry["image"], str(path.resolve())))
    labelled = dict(gather(done, dist) if dist else done)
    result = []
    for entry in entries:
        new = dict(entry)
        if entry["image"] in labelled:
            new["label_given"] = entry.get("label")
            new["label"] = labelled[entry["image"]]
        result.append(new)
    return result
