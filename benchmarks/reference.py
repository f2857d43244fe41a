"""The MONAI/PyTorch reference pipeline: the runtime's test oracle and the benchmark peer.

Two modes, both on the PyTorch networks of the checkpoint folder behind a bundle:

``mirror``
    Exactly the steps of ``Segmenter.segment`` (``docs/architecture.md``, "What Segmenter.segment does"),
    built from MONAI/PyTorch components: MONAI ``LoadImage`` + ``Orientation("RAS")``, MONAI ``Resize``
    (trilinear / nearest-exact, ``align_corners=False``), ``ScaleIntensityRange``, ``sliding_window_inference``,
    ``torch.argmax``. Geometry (affines of crops and resampled grids) is tracked by MONAI's ``MetaTensor``, not by
    ``flare.runtime.ops.geometry``, so the two implementations check each other. Left/right splitting and
    post-processing are the shared numpy functions of ``flare.runtime``.

``whole-image-nearest`` (alias ``auto3dseg``, its old name)
    A plain MONAI pipeline with Auto3DSeg-like inference settings: ``Orientationd("RAS")`` + ``Spacingd`` of the
    whole image to the bundle spacing (no locator crop), ``ScaleIntensityRanged``, sliding window with overlap 0.625
    and Gaussian blending, AMP on CUDA, the folds' softmax averaged, argmax, left/right split and post-processing
    on the resampled grid, then ``Invertd`` of the **label map** with nearest-neighbour interpolation back to the
    input grid. It is not what Auto3DSeg itself does at the end (Auto3DSeg inverts the probabilities, then takes
    the argmax in the input grid), hence the name; ``auto3dseg`` is still accepted and means this mode.

The public entry points are :func:`load_reference` (networks once) and :class:`ReferencePipeline.segment`; each
stage is its own function so the benchmark can time them and tests can check them one by one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from flare.runtime.bundle.manifest import Bundle, load_bundle
from flare.runtime.foundation.errors import BundleError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

Mode = Literal["mirror", "whole-image-nearest", "auto3dseg"]
WHOLE_IMAGE_NEAREST = "whole-image-nearest"
#: old mode names -> the mode they mean
MODE_ALIASES: dict[str, str] = {"auto3dseg": WHOLE_IMAGE_NEAREST}
MODES: tuple[str, ...] = ("mirror", WHOLE_IMAGE_NEAREST, *MODE_ALIASES)
AUTO3DSEG_OVERLAP = 0.625  # Auto3DSeg's SegResNet inference overlap
Z_MARGIN_MM = 10.0
ORGAN_MERGED = tuple(range(1, 12))  # merged classes 1..11 = the organs (tumor is the last merged class)


@dataclass
class ReferenceModels:
    """PyTorch networks (eval mode, on ``device``) of one checkpoint folder."""

    locator: Any | None
    folds: list[Any]
    device: str
    checkpoint_dir: Path


@dataclass
class Canonical:
    """The input in RAS (a MONAI MetaTensor ``(1, X, Y, Z)``) and what is needed to go back."""

    image: Any  # MetaTensor, float32, RAS
    original_affine: np.ndarray
    original_axcodes: tuple[str, ...]
    original_shape: tuple[int, int, int]


@dataclass
class ReferenceResult:
    labels: np.ndarray  # uint8 FLARE ids in the input grid
    affine: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- loading
def checkpoint_dir_of(bundle: Bundle, checkpoints: str | Path | None = None) -> Path:
    """The checkpoint folder behind ``bundle`` (``provenance.checkpoint_dir``), or ``checkpoints`` when given."""
    if checkpoints is not None:
        folder = Path(checkpoints)
    else:
        named = bundle.provenance.get("checkpoint_dir")
        if not named:
            raise BundleError(bundle.root / "bundle.json", "provenance.checkpoint_dir is not set: pass --checkpoints DIR "
                                                            "for the MONAI reference")
        folder = Path(str(named))
        if not folder.is_absolute():
            folder = (bundle.root / folder).resolve()
    if not folder.is_dir():
        raise BundleError(folder, "checkpoint folder for the MONAI reference does not exist (pass --checkpoints DIR)")
    return folder


def resolve_torch_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda``/``trt`` style names map to ``cuda``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu" if device == "cpu" else "cuda"


def load_reference_models(bundle: Bundle, checkpoints: str | Path | None = None, device: str = "cpu",
                          folds: int | None = None) -> ReferenceModels:
    """Load the locator (when the bundle has one) and the first ``folds`` (default: all) bundle folds' networks
    from the checkpoint folder."""
    from flare.train.checkpoints import load_network

    folder = checkpoint_dir_of(bundle, checkpoints)
    dev = resolve_torch_device(device)

    def load(name: str) -> Any:
        path = folder / name
        if not (path / "model.pt").is_file():
            raise BundleError(path, "model.pt is missing in the checkpoint folder")
        try:
            net, _ = load_network(path)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise BundleError(path, f"cannot load checkpoint ({exc.__class__.__name__}: {exc})") from None
        return net.to(dev).eval()

    locator = load("locator") if bundle.locator is not None else None
    nets = [load(f"fold{k}") for k in range(folds or len(bundle.folds))]
    return ReferenceModels(locator, nets, dev, folder)


# ---------------------------------------------------------------------------------------------- stage: read
def read_canonical(path: str | Path) -> Canonical:
    """MONAI ``LoadImage`` (channel first, float32) + ``Orientation("RAS")``."""
    import nibabel as nib
    from monai.transforms import LoadImage, Orientation

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "input image does not exist")
    try:
        img = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(path))
    except Exception as exc:  # noqa: BLE001  MONAI wraps nibabel's reader errors in several classes
        raise InputError(path, f"cannot read image ({exc.__class__.__name__})") from None
    if img.ndim != 4 or img.shape[0] != 1:
        raise InputError(path, f"expected a 3-D image, got shape {tuple(img.shape[1:])}")
    affine = np.asarray(img.affine, dtype=np.float64)
    codes = tuple(nib.orientations.aff2axcodes(affine))
    shape = tuple(int(s) for s in img.shape[1:])
    ras = Orientation(axcodes="RAS")(img)
    return Canonical(ras, affine, codes, shape)  # type: ignore[arg-type]


def spacing_of(image: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm) from a MetaTensor's affine."""
    from monai.data.utils import affine_to_spacing

    return tuple(float(s) for s in affine_to_spacing(image.affine, r=3))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- helpers
def _shape_at(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, int, int]:
    from flare.runtime.ops.resample import output_shape

    return tuple(int(v) for v in output_shape(tuple(shape), tuple(spacing), tuple(target)))  # type: ignore[return-value]


def _window(image_1xyz: Any, hu: tuple[float, float]) -> Any:
    from monai.transforms import ScaleIntensityRange

    return ScaleIntensityRange(a_min=hu[0], a_max=hu[1], b_min=0.0, b_max=1.0, clip=True)(image_1xyz)


def _sliding(vol: Any, net: Any, roi: tuple[int, ...], overlap: float, blend: str, softmax: bool,
             device: str, amp: bool = False, divisor: int = 16) -> Any:
    """``sliding_window_inference`` on ``vol (1, 1, X, Y, Z)`` with sw_batch_size 1; result on the CPU. Tiles are
    padded to multiples of ``divisor`` (the model's ``spatial_divisor``), as the runtime pads them."""
    import torch
    from monai.inferers import sliding_window_inference

    def predictor(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        out = out.float()
        return torch.softmax(out, dim=1) if softmax else out

    from flare.runtime.inference.tiling import effective_roi  # the runtime's rule: same tiles

    roi_eff = effective_roi(tuple(vol.shape[2:]), roi, divisor)
    with torch.no_grad(), torch.autocast("cuda", enabled=amp and device == "cuda"):
        out = sliding_window_inference(vol.to(device), roi_size=roi_eff, sw_batch_size=1, predictor=predictor,
                                       overlap=overlap, mode=blend, sigma_scale=0.125, padding_mode="constant",
                                       cval=0.0, sw_device=device, device="cpu")
    return out.as_tensor() if hasattr(out, "as_tensor") else out


# -------------------------------------------------------------------------------------------- stage: locate
def locate_box(image: Any, bundle: Bundle, locator: Any | None, device: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Locator x/y box on the RAS grid (``lo``, ``hi`` exclusive), z whole; the whole image without a locator.

    The coarse grid is MONAI ``Resize`` of the whole image to the locator spacing; foreground is logit > 0 (one
    channel) or argmax > 0; the box maps coarse voxel ``c`` to fine voxels ``[floor(c*s), ceil((c+1)*s))`` with
    ``s = n_fine / n_coarse``, widened by ``ceil(margin_mm / spacing)`` and clipped.
    """
    import warnings

    import torch
    from monai.transforms import Resize

    shape = tuple(int(s) for s in image.shape[1:])
    whole = ((0, 0, 0), shape)
    if locator is None:
        return whole
    spacing = spacing_of(image)
    coarse_shape = _shape_at(shape, spacing, bundle.locator_spacing_mm)
    small = _window(Resize(coarse_shape, mode="trilinear", align_corners=False)(image), bundle.hu_window)
    assert bundle.locator is not None
    logits = _sliding(small.as_tensor()[None].float(), locator, bundle.locator_roi, 0.0, "constant", False, device,
                      divisor=bundle.locator.spatial_divisor)
    fg = (logits[0, 0] > 0) if logits.shape[1] == 1 else (torch.argmax(logits[0], dim=0) > 0)
    fg_np = fg.numpy()
    if not fg_np.any():
        warnings.warn("reference locator found no foreground: using the whole image", stacklevel=2)
        return whole
    lo, hi = list(whole[0]), list(whole[1])
    for axis in (0, 1):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg_np.any(axis=other))
        scale = shape[axis] / coarse_shape[axis]
        margin = math.ceil(bundle.locator_margin_mm / spacing[axis])
        # 1e-9: exact multiples (3 * 4.0) must not round one voxel outwards
        lo[axis] = max(0, math.floor(idx[0] * scale + 1e-9) - margin)
        hi[axis] = min(shape[axis], math.ceil((idx[-1] + 1) * scale - 1e-9) + margin)
    return tuple(lo), tuple(hi)


# ------------------------------------------------------------------------------------- stage: crop_resample
def crop_resample(image: Any, box: tuple[tuple[int, ...], tuple[int, ...]], bundle: Bundle) -> tuple[Any, tuple[int, ...]]:
    """``SpatialCrop`` in the original grid, MONAI ``Resize`` to the bundle spacing, then the HU window.

    Returns the volume as a MetaTensor ``(1, X, Y, Z)`` (its affine is the 1 mm grid's) and the crop's shape.
    """
    from monai.transforms import Resize, SpatialCrop

    crop = SpatialCrop(roi_start=box[0], roi_end=box[1])(image)
    crop_shape = tuple(int(s) for s in crop.shape[1:])
    out_shape = _shape_at(crop_shape, spacing_of(crop), bundle.spacing_mm)
    vol = _window(Resize(out_shape, mode="trilinear", align_corners=False)(crop), bundle.hu_window)
    return vol, crop_shape


# --------------------------------------------------------------------------------------------- stage: infer
def z_range(labels0: np.ndarray, spacing_z: float, margin_mm: float = Z_MARGIN_MM) -> tuple[int, int] | None:
    """z-range (``z0``, ``z1`` exclusive) of merged organ classes 1..11 widened by ``margin_mm``; None if none."""
    organ = np.isin(labels0, ORGAN_MERGED)
    zs = np.flatnonzero(organ.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    margin = math.ceil(margin_mm / spacing_z)
    return max(0, int(zs[0]) - margin), min(labels0.shape[2], int(zs[-1]) + 1 + margin)


def infer_mirror(vol: Any, models: ReferenceModels, bundle: Bundle, overlap: float, blend: str) -> np.ndarray:
    """Fold 0 on the whole volume; z-crop rule; the folds' softmax summed; argmax -> merged classes (uint8)."""
    import torch
    from flare.runtime.foundation.labels import MERGED_TUMOR

    x = vol.as_tensor()[None].float()  # (1, 1, X, Y, Z)
    div = bundle.fold_divisor
    acc = _sliding(x, models.folds[0], bundle.roi, overlap, blend, True, models.device, divisor=div)[0]
    labels0 = torch.argmax(acc, dim=0).to(torch.uint8).numpy()
    z0, z1 = 0, x.shape[-1]
    rng = z_range(labels0, spacing_of(vol)[2])
    if rng is not None:
        outside = np.ones(labels0.shape[2], bool)
        outside[rng[0]:rng[1]] = False
        if not (labels0[:, :, outside] == MERGED_TUMOR).any():
            z0, z1 = rng
    for net in models.folds[1:]:
        acc[..., z0:z1] += _sliding(x[..., z0:z1], net, bundle.roi, overlap, blend, True, models.device,
                                    divisor=div)[0]
    return torch.argmax(acc, dim=0).to(torch.uint8).numpy()


def infer_whole_image(vol: Any, models: ReferenceModels, bundle: Bundle) -> np.ndarray:
    """Every fold on the whole volume, overlap 0.625, Gaussian, AMP on CUDA; softmax averaged."""
    import torch

    x = vol.as_tensor()[None].float()
    kw: dict[str, Any] = {"amp": True, "divisor": bundle.fold_divisor}
    acc = _sliding(x, models.folds[0], bundle.roi, AUTO3DSEG_OVERLAP, "gaussian", True, models.device, **kw)[0]
    for net in models.folds[1:]:
        acc += _sliding(x, net, bundle.roi, AUTO3DSEG_OVERLAP, "gaussian", True, models.device, **kw)[0]
    return torch.argmax(acc, dim=0).to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------- stage: postprocess
def postprocess_labels(merged: np.ndarray, affine_1mm: np.ndarray, bundle: Bundle) -> np.ndarray:
    """Merged classes -> FLARE ids; the runtime's numpy ``split_left_right`` and ``postprocess`` with the bundle's
    rules (``postprocess.mode``, the paper's by default), as ``flare-run`` applies them by default."""
    from flare.runtime.foundation.labels import merged_to_flare
    from flare.runtime.ops.lr_split import split_left_right
    from flare.runtime.ops.postprocessing import postprocess

    spacing = tuple(float(v) for v in np.sqrt((np.asarray(affine_1mm)[:3, :3] ** 2).sum(axis=0)))
    labels = split_left_right(merged_to_flare(merged), np.asarray(affine_1mm, dtype=np.float64))
    return postprocess(labels, spacing, mode=bundle.postprocess_mode, min_tumor_voxels=bundle.min_tumor_voxels,
                       organs=bundle.largest_component, z_pass=bundle.z_pass)


# --------------------------------------------------------------------------------------------- stage: restore
def restore(labels: np.ndarray, crop_shape: tuple[int, ...], box: tuple[tuple[int, ...], tuple[int, ...]],
            canon: Canonical) -> np.ndarray:
    """MONAI ``Resize`` nearest-exact to the crop, uncrop into the RAS grid, ``Orientation`` back to the input's."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Resize

    back: Any = Resize(crop_shape, mode="nearest-exact")(torch.from_numpy(labels[None].astype(np.float32)))
    ras_shape = tuple(int(s) for s in canon.image.shape[1:])
    full = np.zeros(ras_shape, np.uint8)
    (x0, y0, z0), (x1, y1, z1) = box
    full[x0:x1, y0:y1, z0:z1] = np.asarray(back[0]).astype(np.uint8)
    meta = MetaTensor(torch.from_numpy(full[None]), affine=canon.image.affine)
    orig: Any = Orientation(axcodes="".join(canon.original_axcodes))(meta)
    out = np.ascontiguousarray(orig.as_tensor()[0].numpy().astype(np.uint8))
    if out.shape != canon.original_shape:
        raise RuntimeError(f"reference restore produced {out.shape}, expected {canon.original_shape}")
    return out


# ------------------------------------------------------------------------------- whole-image-nearest stages
def whole_image_preprocess(path: str | Path, bundle: Bundle) -> tuple[dict[str, Any], Any]:
    """Dictionary transforms: load, channel first, RAS, ``Spacingd`` (bilinear) to the bundle spacing, HU window."""
    from monai.transforms import Compose, LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd

    hu = bundle.hu_window
    pre = Compose([
        LoadImaged(keys="image", image_only=True, ensure_channel_first=True, reader="NibabelReader"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=bundle.spacing_mm, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=hu[0], a_max=hu[1], b_min=0.0, b_max=1.0, clip=True),
    ])
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "input image does not exist")
    return pre({"image": str(path)}), pre


def invert_labels_nearest(labels: np.ndarray, data: dict[str, Any], pre: Any) -> np.ndarray:
    """``Invertd`` (nearest) of the label map back through Spacing and Orientation to the input grid."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    img = data["image"]
    pred = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), meta=dict(img.meta))  # affine: meta's
    pred.applied_operations = img.applied_operations
    inv = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)
    out = inv({"pred": pred, "image": img})["pred"]
    return np.ascontiguousarray(np.rint(np.asarray(out[0])).astype(np.uint8))


# -------------------------------------------------------------------------------------------- the pipeline
class ReferencePipeline:
    """Networks loaded once; :meth:`segment` runs one case in ``mirror`` or ``whole-image-nearest`` mode."""

    def __init__(self, bundle: str | Path | Bundle, checkpoints: str | Path | None = None, device: str = "cpu",
                 mode: str = "mirror", overlap: float | None = None, blend: str | None = None,
                 folds: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.mode = MODE_ALIASES.get(mode, mode)
        self.overlap = self.bundle.overlap if overlap is None else float(overlap)
        # like the runtime: any overlap blends with Gaussian weights
        self.blend = blend or ("gaussian" if self.overlap > 0 else self.bundle.blend)
        t0 = time.perf_counter()
        if folds is not None and not 1 <= folds <= len(self.bundle.folds):
            raise BundleError(self.bundle.root, f"{folds} fold(s) asked for, the bundle has {len(self.bundle.folds)}")
        self.models = load_reference_models(self.bundle, checkpoints, device, folds)
        self.load_s = time.perf_counter() - t0

    def segment(self, path: str | Path) -> ReferenceResult:
        """Segment ``path``; returns uint8 FLARE labels in the input grid, its affine and a per-stage report."""
        import torch

        with torch.inference_mode():
            return self._segment(path)

    def _segment(self, path: str | Path) -> ReferenceResult:
        if self.mode == WHOLE_IMAGE_NEAREST:
            return self._segment_whole_image(path)
        stages: dict[str, float] = {}
        t = time.perf_counter()
        canon = read_canonical(path)
        stages["read"] = _lap(t)
        t = time.perf_counter()
        box = locate_box(canon.image, self.bundle, self.models.locator, self.models.device)
        stages["locate"] = _lap(t)
        t = time.perf_counter()
        vol, crop_shape = crop_resample(canon.image, box, self.bundle)
        stages["crop_resample"] = _lap(t)
        t = time.perf_counter()
        merged = infer_mirror(vol, self.models, self.bundle, self.overlap, self.blend)
        stages["infer"] = _lap(t)
        t = time.perf_counter()
        labels = postprocess_labels(merged, np.asarray(vol.affine, dtype=np.float64), self.bundle)
        stages["postprocess"] = _lap(t)
        t = time.perf_counter()
        out = restore(labels, crop_shape, box, canon)
        stages["restore"] = _lap(t)
        report = self._report(path, canon.original_shape, stages, {"lo": list(box[0]), "hi": list(box[1])})
        return ReferenceResult(out, canon.original_affine, report)

    def _segment_whole_image(self, path: str | Path) -> ReferenceResult:
        stages: dict[str, float] = {}
        t = time.perf_counter()
        data, pre = whole_image_preprocess(path, self.bundle)
        stages["read_resample"] = _lap(t)
        vol = data["image"]
        t = time.perf_counter()
        merged = infer_whole_image(vol, self.models, self.bundle)
        stages["infer"] = _lap(t)
        t = time.perf_counter()
        labels = postprocess_labels(merged, np.asarray(vol.affine, dtype=np.float64), self.bundle)
        stages["postprocess"] = _lap(t)
        t = time.perf_counter()
        out = invert_labels_nearest(labels, data, pre)
        stages["restore"] = _lap(t)
        affine = np.asarray(data["image"].meta.get("original_affine", vol.affine), dtype=np.float64)
        report = self._report(path, tuple(out.shape), stages, None)
        return ReferenceResult(out, affine, report)

    def _report(self, path: str | Path, shape: tuple[int, ...], stages: dict[str, float],
                crop: dict[str, list[int]] | None) -> dict[str, Any]:
        overlap = AUTO3DSEG_OVERLAP if self.mode == WHOLE_IMAGE_NEAREST else self.overlap
        blend = "gaussian" if self.mode == WHOLE_IMAGE_NEAREST else self.blend
        return {"input": {"path": str(path), "shape": list(shape)}, "crop": crop, "mode": self.mode,
                "backend": f"monai-torch-{self.models.device}", "folds": len(self.models.folds),
                "overlap": overlap, "blend": blend, "load_s": self.load_s, "stages": stages,
                "total_s": float(sum(stages.values()))}


def _lap(t0: float) -> float:
    return time.perf_counter() - t0


def reference_segment(path: str | Path, bundle: str | Path | Bundle, *, checkpoints: str | Path | None = None,
                      mode: str = "mirror", device: str = "cpu", overlap: float | None = None,
                      blend: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One-shot reference segmentation with the same return shape as ``flare.runtime.segment``."""
    res = ReferencePipeline(bundle, checkpoints, device, mode, overlap, blend).segment(path)
    return res.labels, res.affine, res.report
