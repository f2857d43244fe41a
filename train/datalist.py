"""Datalists: read (flare's own and MONAI Auto3DSeg's), write (paths relative to the file), build from a FLARE23 tree.

A datalist is a MONAI ``dataset.json``: ``training`` entries with ``image``, ``label`` (FLARE ids, possibly
partial) and ``fold``; optionally ``labels_present`` (the FLARE ids in the label file, written by
``flare-train datalist`` so nothing has to read 2200 label files again), ``label_full`` (complete truth, phantoms),
``label_given`` (the original label of a pseudo-labelled case), a ``testing`` list of held-out cases and an
``unlabeled`` list of cases without labels.

Paths: relative paths resolve against ``dataroot`` when the file has one (Auto3DSeg; a relative ``dataroot``
resolves against the file's folder), else against the file's own folder. Every datalist flare writes stores its
paths relative to its own folder (:func:`write_datalist`), so a checkpoint folder can be moved or used from any cwd.

Unlabelled cases (no ``label``) never train unless asked (``include_unlabelled``): the paper pseudo-labels only the
partially labelled cases; :func:`load_datalist` moves them from ``training`` into ``unlabeled``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.atomic import write_text_atomic
from flare.runtime.foundation.errors import InputError, OutputError

#: entry keys that hold file paths
PATH_KEYS = ("image", "label", "label_full", "label_given")
LISTS = ("training", "testing", "unlabeled")
SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


def case_name(entry: dict[str, Any] | str | Path) -> str:
    """File name without its image suffix."""
    name = Path(entry["image"] if isinstance(entry, dict) else entry).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def label_ids(path: str | Path | None) -> set[int]:
    """The FLARE ids present in a label file (empty for no file). Read once per file version: the fold split, the
    locator, every fold and pseudo-labelling all ask for the same labels (datalists without ``labels_present``)."""
    if not path:
        return set()
    st = os.stat(path)
    return set(_label_ids_of(str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=65536)
def _label_ids_of(path: str, mtime_ns: int, size: int) -> frozenset[int]:
    import nibabel as nib

    try:
        img: Any = nib.load(path)
        arr = np.asarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise InputError(path, f"cannot read the label file ({type(err).__name__}: {err})") from None
    arr = arr.reshape(arr.shape[:3]) if arr.ndim > 3 and all(n == 1 for n in arr.shape[3:]) else arr
    if arr.ndim != 3:
        raise InputError(path, f"a label map must be one 3-D volume; this one has shape {arr.shape}")
    check_label_values(path, arr)
    ids = np.flatnonzero(np.bincount(arr.astype(np.intp).ravel(), minlength=L.NUM_FLARE_IDS))
    return frozenset(int(i) for i in ids if i != 0)


def check_label_values(path: str | Path, arr: np.ndarray, whole: bool = True) -> None:
    """Every voxel a FLARE id (an integer 0-14; float files must hold whole numbers; ``whole=False`` skips that last,
    costlier check), checked before anything is allocated from the values (one-line ``InputError``)."""
    if arr.dtype.kind not in "uif":
        raise InputError(path, f"label voxels are {arr.dtype}; a label map holds integers 0-{L.NUM_FLARE_IDS - 1}")
    if arr.size == 0:
        return
    lo, hi = arr.min(), arr.max()
    if arr.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(path, "label map holds NaN or infinite values")
    if lo < 0 or hi > L.NUM_FLARE_IDS - 1:
        raise InputError(path, f"label values run from {lo:g} to {hi:g}; FLARE ids are 0-{L.NUM_FLARE_IDS - 1} "
                               "(relabel the file: flare-train uses the FLARE23 label ids)")
    if whole and arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise InputError(path, "label map holds fractional values; a label map holds whole FLARE ids")


def given_ids(entry: dict[str, Any]) -> set[int]:
    """The FLARE ids of the label a case came with (``label_given`` of a pseudo-labelled case, else ``label``):
    ``labels_present`` when the datalist has it, else read from the file."""
    if "labels_present" in entry:
        return {int(i) for i in entry["labels_present"]}
    return label_ids(original_label(entry))


def fully_labelled(ids: set[int]) -> bool:
    """All 13 organs present (the paper's definition; tumour is not required)."""
    return set(L.ORGAN_IDS) <= ids


def folds_of(entries: list[dict[str, Any]], fold: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation) entries of ``fold``: validation = entries whose ``fold`` equals it."""
    train = [e for e in entries if int(e.get("fold", -1)) != fold]
    val = [e for e in entries if int(e.get("fold", -1)) == fold]
    return train, val


def draw_folds(entries: list[dict[str, Any]], folds: int, seed: int) -> list[dict[str, Any]]:
    """Copies of ``entries`` dealt into ``folds`` folds after a permutation seeded by ``seed`` (a split drawn
    independently of the datalist's ``fold``)."""
    order = np.random.default_rng(seed).permutation(len(entries))
    out = [dict(e) for e in entries]
    for rank, idx in enumerate(order):
        out[int(idx)]["fold"] = int(rank % folds)
    return out


def assign_folds(entries: list[dict[str, Any]], folds: int) -> list[dict[str, Any]]:
    """Keep the datalist's folds; entries without one get ``index % folds``."""
    return [e if "fold" in e else {**e, "fold": i % folds} for i, e in enumerate(entries)]


def original_label(entry: dict[str, Any]) -> str | None:
    """The label a case came with (before pseudo-labelling)."""
    return entry["label_given"] if "label_given" in entry else entry.get("label")


def _resolve(value: Any, base: Path, where: Path, what: str) -> str:
    if isinstance(value, list):  # Auto3DSeg allows a list of channels; flare is single-channel CT
        if len(value) != 1:
            raise InputError(where, f"{what} lists {len(value)} channels; flare trains on one (CT)")
        value = value[0]
    if not isinstance(value, str) or not value:
        raise InputError(where, f"{what} must be a file path (a string), not {json.dumps(value)}")
    p = Path(value)
    full = p if p.is_absolute() else base / p
    if not full.is_file():
        raise InputError(full, f"file of {what} does not exist")
    return str(full.resolve())


def _check_fields(entry: dict[str, Any], path: Path, where: str) -> None:
    """``fold``: an integer >= 0; ``labels_present``: a list of FLARE ids (one-line ``InputError``)."""
    fold = entry.get("fold")
    if fold is not None and (type(fold) is not int or fold < 0):
        raise InputError(path, f"{where}.fold must be an integer >= 0, not {json.dumps(fold)}")
    present = entry.get("labels_present")
    if present is not None and (not isinstance(present, list) or any(
            type(i) is not int or not 0 <= i < L.NUM_FLARE_IDS for i in present)):
        raise InputError(path, f"{where}.labels_present must list FLARE ids 0-{L.NUM_FLARE_IDS - 1}, "
                               f"not {json.dumps(present)[:80]}")


def load_datalist(path: str | Path, *, include_unlabelled: bool = False) -> dict[str, Any]:
    """Read a datalist (or ``DIR/dataset.json``) with absolute paths; raises InputError on missing files/keys.

    Training entries without a ``label`` move to ``unlabeled`` unless ``include_unlabelled``, in which case the
    ``unlabeled`` list joins ``training`` (folds assigned round-robin where missing).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise InputError(path, "datalist does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot parse datalist: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("training"), list) or not doc["training"]:
        raise InputError(path, "datalist has no 'training' entries")
    base = path.parent.resolve()
    folds = doc.get("num_folds", 5)
    if type(folds) is not int or folds < 1:
        raise InputError(path, f"num_folds must be a positive integer, not {json.dumps(folds)}")
    if doc.get("dataroot") is not None and not isinstance(doc["dataroot"], str):
        raise InputError(path, f"dataroot must be a folder path (a string), not {json.dumps(doc['dataroot'])}")
    if doc.get("dataroot"):
        root = Path(doc["dataroot"])
        base = root if root.is_absolute() else (base / root).resolve()
        if not base.is_dir():
            raise InputError(path, f"dataroot {doc['dataroot']} is not a folder")
    for list_name in LISTS:
        entries = doc.get(list_name) or []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry:
                raise InputError(path, f"{list_name}[{n}] has no 'image'")
            for key in PATH_KEYS:
                if entry.get(key):
                    entry[key] = _resolve(entry[key], base, path, f"{list_name}[{n}].{key}")
            _check_fields(entry, path, f"{list_name}[{n}]")
        doc[list_name] = entries
    labelled = [e for e in doc["training"] if e.get("label") or e.get("label_given")]
    unlabelled = [e for e in doc["training"] if not (e.get("label") or e.get("label_given"))] + doc["unlabeled"]
    if include_unlabelled:
        doc["training"] = labelled + assign_folds(unlabelled, folds)
        doc["unlabeled"] = []
    else:
        doc["training"], doc["unlabeled"] = labelled, unlabelled
    if not doc["training"]:
        raise InputError(path, "datalist has no labelled training case (unlabelled ones train only with "
                               "--include-unlabelled)")
    doc["_path"] = str(path.resolve())
    return doc


def relative_to(path: str | Path, folder: str | Path) -> str:
    """``path`` relative to ``folder`` (both made absolute), ``/``-separated."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def check_json_output(out: Path, reads: Iterable[str | Path], role: str) -> None:
    """Refuse a JSON output (one-line ``OutputError``) that does not end in ``.json``, is a folder, or would replace a
    file this command reads (``reads``: files, or folders whose files are all protected)."""
    from flare.runtime.app.output_guard import check_outputs

    if not out.name.lower().endswith(".json"):
        raise OutputError(out, f"the {role} is JSON: give a file name ending in .json")
    check_outputs(reads, {role: out}, writable=False)


def datalist_files(doc: dict[str, Any]) -> list[str | Path]:
    """The datalist file itself and every image and label it names."""
    return [doc["_path"], *(e[k] for name in LISTS for e in doc.get(name) or [] for k in PATH_KEYS if e.get(k))]


def write_datalist(doc: dict[str, Any], path: str | Path) -> Path:
    """Write ``doc`` atomically with every path relative to the file's folder (``dataroot`` and ``_path`` dropped)."""
    path = Path(path)
    out: dict[str, Any] = {k: v for k, v in doc.items() if k not in ("_path", "dataroot", *LISTS)}
    for list_name in LISTS:
        if doc.get(list_name):
            out[list_name] = [{k: (relative_to(v, path.parent) if k in PATH_KEYS and v else v) for k, v in e.items()}
                              for e in doc[list_name]]
    out.setdefault("training", [])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(out, indent=1) + "\n")
    return path


def _images(folder: Path, channel: bool = False) -> dict[str, Path]:
    """Case id -> file of a FLARE23 folder (``channel``: image names carry the nnU-Net channel tag ``_0000``)."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.endswith(SUFFIXES):
            name = case_name(p)
            out[name[:-5] if channel and name.endswith("_0000") else name] = p
    return out


def build_datalist(root: str | Path, out: str | Path, *, folds: int = 5, seed: int = 0,
                   include_unlabelled: bool = False, workers: int = 4,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Datalist of a FLARE23-style tree -> ``out`` (written); returns the document.

    ``ROOT/imagesTr/<id>_0000.nii.gz`` with ``ROOT/labelsTr/<id>.nii.gz`` are training cases (``labels_present`` =
    the FLARE ids in the label file); images without a label and ``ROOT/unlabeledTr/*`` are listed under
    ``unlabeled`` (or trained on, pseudo-labelled, with ``include_unlabelled``). Training cases are shuffled with
    ``seed`` and dealt into ``folds`` folds. ``ROOT/imagesTs`` (if any) becomes ``testing``.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root)
    check_json_output(Path(out), [root / name for name in ("imagesTr", "labelsTr", "unlabeledTr", "imagesTs")],
                      "datalist")
    images, labels = _images(root / "imagesTr", channel=True), _images(root / "labelsTr")
    if not images:
        raise InputError(root / "imagesTr", "no images (expected imagesTr/<id>_0000.nii.gz)")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise InputError(root / "labelsTr" / f"{orphans[0]}.nii.gz", f"label without an image ({len(orphans)} such)")
    ids = sorted(set(images) & set(labels))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        present = []
        for found in pool.map(lambda i: label_ids(labels[i]), ids):
            present.append(found)
            if progress:
                progress(1)
    training: list[dict[str, Any]] = [{"image": str(images[i]), "label": str(labels[i]), "labels_present": sorted(p)}
                for i, p in zip(ids, present, strict=True)]
    order = np.random.default_rng(seed).permutation(len(training))
    for rank, idx in enumerate(order):
        training[idx]["fold"] = int(rank % folds)
    unlabelled = [{"image": str(images[i])} for i in sorted(set(images) - set(labels))]
    unlabelled += [{"image": str(p)} for p in _images(root / "unlabeledTr").values()]
    if include_unlabelled:
        start = len(training)
        training += [{**e, "fold": (start + n) % folds} for n, e in enumerate(unlabelled)]
        unlabelled = []
    doc: dict[str, Any] = {"name": root.resolve().name, "description": f"built by flare-train datalist from {root}",
                           "num_folds": folds, "seed": seed,
                           "n_fully_labelled": sum(fully_labelled(set(p)) for p in present),
                           "training": training,
                           "testing": [{"image": str(p)} for p in _images(root / "imagesTs").values()],
                           "unlabeled": unlabelled}
    write_datalist(doc, out)
    return doc
