"""Lesion copy-paste augmentation (``augment.lesion_paste_prob``; off by default: not in the paper).

A network that sees each labelled tumour only where it lies learns those tumours, not tumours: proof run 7's
two-stage model reaches tumour Dice 0.47 on its own training phantoms and 0.07 on unseen ones, while its organs
score 0.75 and 0.72 (``train/results/RESULTS.md``). This transform moves the tumours the labels already show to new
places: every labelled tumour it meets in a training case (a connected component of the tumour label) goes into a
bank (at most ``BANK_SIZE`` lesions of at most ``MAX_PATCH_VOXELS`` each: about 200 MB at worst; a reservoir
sample once full), and with probability ``prob`` per case one banked tumour is pasted, randomly flipped, at a random
voxel of a host organ the case's label shows. The paste keeps the source's contrast to its own host tissue (tumour
minus the median of the shell around it that carries the shell's commonest label) on top of the destination host
organ's level in the same shell, blends the edge over a Gaussian
(sigma ``EDGE_SIGMA`` voxels, as partial volume does), labels the pasted voxels tumour and adds them to the crop
centres of the tumour class, so crops land on pasted tumours as often as on real ones.

Optionally each paste is also jittered (``augment.lesion_scale`` and ``augment.lesion_contrast``, ``[low, high]``,
absent by default): the lesion is resized by a factor drawn per axis (linear for the image, the mask resampled and
thresholded, its surroundings and shell cut again as ``harvest`` cuts them) and its contrast to its host multiplied
by one drawn factor, so that a few dozen labelled tumours become many shapes, sizes and densities rather than the
same ones in new places.

Runs on the preprocessed case (FLARE ids, 0..1 image) before cropping; only labelled tumours are used, and only
hosts the label shows are pasted into, so partial labels stay consistent. Lesions are copied from the training
cases, never generated: nothing about the test data is assumed beyond what the labels show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.errors import InputError
from monai.transforms import MapTransform, Randomizable

#: FLARE23's lesion hosts (FLARE ids): liver, kidneys, spleen, pancreas, stomach
DEFAULT_HOSTS: tuple[int, ...] = (L.LIVER, L.RIGHT_KIDNEY, L.LEFT_KIDNEY, L.SPLEEN, L.PANCREAS, L.STOMACH)
BANK_SIZE = 128
MIN_VOXELS = 4
#: larger lesions (patch with surroundings, in voxels of the training grid) are not banked: the bank stays under
#: BANK_SIZE x MAX_PATCH_VOXELS x 6 bytes (200 MB) whatever the data (64 mm at 1 mm, 256 mm at 4 mm)
MAX_PATCH_VOXELS = 64**3
MARGIN = 2  # voxels of surroundings kept around a banked tumour (its shell)
EDGE_SIGMA = 0.6


@dataclass(frozen=True)
class Lesion:
    image: np.ndarray  # patch of the 0..1 image, tumour plus MARGIN voxels
    mask: np.ndarray  # bool, the tumour in the patch
    shell: np.ndarray  # bool, the surroundings in the patch (dilated mask minus mask)
    level: float  # median of the image over the shell voxels of the tissue around the tumour (its commonest label)


def harvest(image: np.ndarray, label: np.ndarray, hosts: Sequence[int] = DEFAULT_HOSTS) -> list[Lesion]:
    """The labelled tumours of one case (3-D ``image`` and ``label`` in FLARE ids) that sit in a labelled organ of
    ``hosts``, each with its surroundings (a lesion in fat, lung or an unlabelled organ has no contrast that would
    mean anything inside another organ)."""
    from scipy import ndimage

    comps, _ = ndimage.label(label == L.TUMOR)
    out: list[Lesion] = []
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        box = tuple(slice(max(0, s.start - MARGIN), min(dim, s.stop + MARGIN)) for s, dim in zip(box, label.shape))
        if np.prod([s.stop - s.start for s in box]) > MAX_PATCH_VOXELS:
            continue
        mask = comps[box] == k
        if mask.sum() < MIN_VOXELS:
            continue
        shell = ndimage.binary_dilation(mask, iterations=MARGIN) & ~mask
        patch = image[box].astype(np.float32)
        around = label[box][shell]
        if not around.size:
            continue
        host = int(np.bincount(around).argmax())  # the tissue the tumour sits in (the most common label around it)
        if host not in hosts:
            continue
        out.append(Lesion(patch, mask, shell, float(np.median(patch[shell & (label[box] == host)]))))
    return out


def paste(image: np.ndarray, label: np.ndarray, lesion: Lesion, centre: Sequence[int],
          host: int) -> np.ndarray | None:
    """Paste ``lesion`` centred at voxel ``centre`` of ``image``/``label`` (3-D, modified in place) into organ
    ``host``; returns the flat indices of the voxels now labelled tumour, or None when the lesion does not fit there
    (edge of the volume, fewer than ``MIN_VOXELS`` of its shell in the host)."""
    from scipy import ndimage

    start = [int(c) - s // 2 for c, s in zip(centre, lesion.mask.shape)]
    if any(a < 0 or a + s > dim for a, s, dim in zip(start, lesion.mask.shape, image.shape)):
        return None
    box = tuple(slice(a, a + s) for a, s in zip(start, lesion.mask.shape))
    region = image[box]
    around = lesion.shell & (label[box] == host)
    if around.sum() < MIN_VOXELS:
        return None
    level = float(np.median(region[around]))
    weight = ndimage.gaussian_filter(lesion.mask.astype(np.float32), EDGE_SIGMA)
    region += weight * (lesion.image - lesion.level + level - region)
    np.clip(region, 0.0, 1.0, out=region)
    label[box][lesion.mask] = L.TUMOR
    where = np.nonzero(lesion.mask)
    return np.ravel_multi_index(tuple(w + a for w, a in zip(where, start)), image.shape)


def jittered(lesion: Lesion, zoom: Sequence[float] | None = None, contrast: float | None = None) -> Lesion | None:
    """``lesion`` resized by ``zoom`` (per axis) and/or with its contrast to its host scaled by ``contrast``;
    None when the resized tumour is under ``MIN_VOXELS`` or its patch over ``MAX_PATCH_VOXELS``."""
    from scipy import ndimage

    image, mask, shell = lesion.image, lesion.mask, lesion.shell
    if zoom is not None:
        image = ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)
        mask = ndimage.zoom(mask.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True) >= 0.5
        if mask.sum() < MIN_VOXELS:
            return None
        # the tumour's box with MARGIN voxels of (edge-extended) surroundings, as harvest cuts it
        box = tuple(slice(s.start, s.stop + 2 * MARGIN) for s in ndimage.find_objects(mask.astype(np.uint8))[0])
        if np.prod([s.stop - s.start for s in box]) > MAX_PATCH_VOXELS:
            return None
        image = np.pad(image, MARGIN, mode="edge")[box]
        mask = np.pad(mask, MARGIN)[box]
        shell = ndimage.binary_dilation(mask, iterations=MARGIN) & ~mask
    if contrast is not None:
        image = (lesion.level + contrast * (image - lesion.level)).astype(np.float32)
    return Lesion(image, mask, shell, lesion.level)


def _range(value: Any, name: str) -> tuple[float, float] | None:
    """A ``[low, high]`` config range of positive factors, or None when absent."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0.0 < low <= high:
        raise InputError("config", f"augment.{name} must be [low, high] with 0 < low <= high, not {value!r}")
    return low, high


class RandLesionPasted(Randomizable, MapTransform):
    """Keys ``image``, ``label`` (channel first, FLARE ids) and ``label_cls_indices`` (the crop centres per class);
    see the module docstring."""

    def __init__(self, prob: float, hosts: Sequence[int] = DEFAULT_HOSTS, bank_size: int = BANK_SIZE,
                 scale: Sequence[float] | None = None, contrast: Sequence[float] | None = None) -> None:
        MapTransform.__init__(self, ["image", "label"])
        if not 0.0 <= float(prob) <= 1.0:
            raise InputError("config", f"augment.lesion_paste_prob must lie in [0, 1], not {prob!r}")
        bad = [h for h in hosts if not isinstance(h, int) or not 0 < h < L.TUMOR]
        if bad or not hosts:
            raise InputError("config", f"augment.lesion_hosts must be organ ids 1..{L.TUMOR - 1}, not {list(hosts)!r}")
        self.prob, self.hosts, self.bank_size = float(prob), tuple(hosts), int(bank_size)
        self.scale, self.contrast = _range(scale, "lesion_scale"), _range(contrast, "lesion_contrast")
        self.bank: list[Lesion] = []
        self._seen: set[tuple[Any, ...]] = set()
        self._count = 0  # lesions met so far

    def randomize(self, data: Any = None) -> None:  # the draws happen in __call__, in order
        pass

    def _remember(self, image: np.ndarray, label: np.ndarray, tumour_idx: Any) -> None:
        key = (label.shape, len(tumour_idx), int(tumour_idx[0]))  # a case's tumour indices identify it
        if key in self._seen:
            return
        self._seen.add(key)
        for lesion in harvest(image, label, self.hosts):
            self._count += 1
            if len(self.bank) < self.bank_size:
                self.bank.append(lesion)
            else:  # reservoir sampling: a uniform sample of every lesion met
                j = int(self.R.randint(self._count))
                if j < self.bank_size:
                    self.bank[j] = lesion

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        import torch

        d = dict(data)
        indices = list(d["label_cls_indices"])
        image = np.asarray(d["image"])[0]
        label = np.asarray(d["label"])[0]
        if len(indices[L.TUMOR]):
            self._remember(image, label, indices[L.TUMOR])
        if not self.bank or self.R.random_sample() >= self.prob:
            return d
        hosts = [h for h in self.hosts if len(indices[h])]
        if not hosts:
            return d
        host = hosts[int(self.R.randint(len(hosts)))]
        host_idx = indices[host]
        centre = [int(c) for c in np.unravel_index(int(host_idx[int(self.R.randint(len(host_idx)))]), label.shape)]
        lesion = self.bank[int(self.R.randint(len(self.bank)))]
        flip = tuple(ax for ax in range(3) if self.R.random_sample() < 0.5)
        if flip:
            image_p, mask, shell = (np.ascontiguousarray(np.flip(a, flip)) for a in (lesion.image, lesion.mask,
                                                                                   lesion.shell))
            lesion = Lesion(image_p, mask, shell, lesion.level)
        if self.scale or self.contrast:  # no draws without them: the stream of runs made before stays the same
            zoom = [float(self.R.uniform(*self.scale)) for _ in range(3)] if self.scale else None
            changed = jittered(lesion, zoom, float(self.R.uniform(*self.contrast)) if self.contrast else None)
            if changed is None:
                return d
            lesion = changed
        image, label = image.copy(), label.copy()
        placed = paste(image, label, lesion, centre, host)
        if placed is None:
            return d
        d["image"] = torch.as_tensor(image[None])
        d["label"] = torch.as_tensor(label[None])
        indices[L.TUMOR] = torch.cat([torch.as_tensor(indices[L.TUMOR]).long(), torch.as_tensor(placed).long()])
        d["label_cls_indices"] = indices
        return d
