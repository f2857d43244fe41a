"""The GPU check's benchmark bundle: its rule locator crops a real CT to the body (x/y), its rule fold head labels
soft tissue as an organ and never tumor, so the crop, the z-range and post-processing behave as on anatomy."""

from __future__ import annotations

import numpy as np
import torch
from conftest import data_path
from flare.benchmarks.gpu_bundle import _rule_modules
from flare.runtime.image.model import to_canonical
from flare.runtime.image.nifti import read_image
from flare.runtime.inference.ensemble import abdominal_z_range, foreground_uint8
from flare.runtime.ops.geometry import box_from_mask
from flare.runtime.ops.resample import normalise_hu


def _normalised(name: str) -> np.ndarray:
    data, _, _ = to_canonical(read_image(data_path(name)))
    return normalise_hu(np.asarray(data, dtype=np.float32), (-250.0, 250.0))


def test_rule_locator_crops_to_the_body() -> None:
    RuleLocator, _ = _rule_modules()
    x = _normalised("ts_body_ct_3mm_int32.nii.gz")
    with torch.no_grad():
        logits = RuleLocator()(torch.from_numpy(x)[None, None]).numpy()[0]
        everything = RuleLocator(keep_all=True)(torch.from_numpy(x)[None, None]).numpy()[0]
    box = box_from_mask(foreground_uint8(logits, np) > 0)
    assert box is not None
    extent = [h - lo for lo, h in zip(box.lo, box.hi)]
    body = (x > 0.35).sum(axis=2) > 0
    assert extent[0] <= x.shape[0] and extent[1] < x.shape[1]  # air around the body is cut away in y at least
    assert extent[0] * extent[1] >= 0.8 * np.count_nonzero(body.any(axis=1)) * np.count_nonzero(body.any(axis=0))
    assert (foreground_uint8(everything, np) > 0).all()


def test_rule_fold_labels_tissue_never_tumor() -> None:
    _, RuleFold = _rule_modules()
    x = _normalised("ts_abdomen_ct_3mm.nii.gz")
    net = torch.nn.Conv3d(1, 13, 1)  # stands in for the random SegResNetDS: its logits are scaled by 1e-2
    with torch.no_grad():
        labels = RuleFold(net, 13)(torch.from_numpy(x)[None, None]).numpy()[0].argmax(axis=0)
    assert set(np.unique(labels)) == {0, 1}
    liver = labels == 1
    assert 0.05 < liver.mean() < 0.8
    assert abdominal_z_range(labels.astype(np.uint8), 3.0) is not None
