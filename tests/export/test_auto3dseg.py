"""flare-export --from-auto3dseg: a work dir built with MONAI's SegResNetDS converts to a bundle whose ONNX models,
fed the runtime's normalisation, reproduce Auto3DSeg's own preprocessing + network (+ left/right merge)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import data_path
from flare.runtime.bundle.manifest import load_bundle
from flare.runtime.foundation.errors import InputError
from flare.runtime.foundation.labels import FLARE_TO_MERGED, NUM_MERGED_CLASSES

pytest.importorskip("yaml")

HP = """\
bundle_root: null
input_channels: 1
output_classes: {classes}
roi_size: [64, 64, 32]
resample: true
resample_resolution: [3.0, 3.0, 3.0]
normalize_mode: {mode}
intensity_bounds: [-200.0, 300.0]
network:
  _target_: SegResNetDS
  init_filters: 4
  blocks_down: [1, 1, 1, 1, 1]
  norm: INSTANCE_NVFUSER
  in_channels: '@input_channels'
  out_channels: '@output_classes'
  dsdepth: 4
"""


def _net(classes: int, affine: bool, seed: int):
    import torch
    from monai.networks.nets import SegResNetDS

    torch.manual_seed(seed)
    return SegResNetDS(spatial_dims=3, init_filters=4, blocks_down=(1, 1, 1, 1, 1), in_channels=1,
                       out_channels=classes, norm=("instance", {"affine": affine}), dsdepth=4).eval()


def _work_dir(root: Path, classes: int = 15, mode: str = "range") -> tuple[Path, list]:
    """segresnet_0 (plain instance norm) and segresnet_1 (affine instance norm, DDP-prefixed keys)."""
    import torch

    nets = []
    for fold, affine in ((0, False), (1, True)):
        d = root / f"segresnet_{fold}"
        (d / "configs").mkdir(parents=True)
        (d / "model").mkdir()
        (d / "configs" / "hyper_parameters.yaml").write_text(HP.format(classes=classes, mode=mode))
        net = _net(classes, affine, fold)
        if affine:  # non-trivial affine parameters
            with torch.no_grad():
                for name, p in net.named_parameters():
                    if "norm" in name:
                        p.add_(0.1 * torch.randn_like(p))
        prefix = "module." if fold == 1 else ""
        state = {prefix + k: v for k, v in net.state_dict().items()}
        torch.save({"state_dict": state, "epoch": 3, "best_metric": 0.5}, d / "model" / "model.pt")
        nets.append(net)
    return root, nets


def test_auto3dseg_import_matches_monai(tmp_path: Path) -> None:
    import nibabel as nib
    import onnxruntime as ort
    import torch
    from flare.export import export_auto3dseg

    ct = data_path("ts_abdomen_ct_3mm.nii.gz")

    work, nets = _work_dir(tmp_path / "work")
    # verify=False: the comparison below with MONAI's own preprocessing is the stronger check (and keeps it fast)
    out = export_auto3dseg(work, tmp_path / "bundle", fp16=True, verify=False, progress=False)
    b = load_bundle(out)
    assert b.locator is None and len(b.folds) == 2 and b.precisions == ("fp32", "fp16")
    assert all(f.out_channels == NUM_MERGED_CLASSES for f in b.folds)
    assert b.spacing_mm == (3.0, 3.0, 3.0) and b.roi == (64, 64, 32)
    assert b.hu_window == (-200.0 - 1750.0, 300.0 + 1750.0)
    assert b.provenance["source"] == "auto3dseg" and b.provenance["checkpoints"]["fold1"]["path"] == \
        "segresnet_1/model/model.pt"

    # a real-CT tile through both paths: Auto3DSeg's (ScaleIntensityRange -1..1 unclipped, sigmoid, net, softmax,
    # then summing left+right probabilities) and the runtime's (clip to the bundle window, ONNX, softmax)
    from monai.transforms import ScaleIntensityRange

    hu = np.asanyarray(nib.load(str(ct)).dataobj).astype(np.float32)
    hu = np.pad(hu[37:85, 26:74, :], ((0, 0), (0, 0), (1, 1)), constant_values=-1000.0)  # 48x48x32
    x_monai = torch.sigmoid(ScaleIntensityRange(-200.0, 300.0, -1.0, 1.0, clip=False)(torch.from_numpy(hu)))
    lo, hi = b.hu_window
    x_runtime = np.clip((hu - lo) / (hi - lo), 0, 1)[None, None].astype(np.float32)
    for k, net in enumerate(nets):
        with torch.no_grad():
            p15 = torch.softmax(net(x_monai[None, None]), 1)[0].numpy()
        p13 = np.zeros((NUM_MERGED_CLASSES, *p15.shape[1:]), np.float32)
        for flare_id in range(15):
            p13[FLARE_TO_MERGED[flare_id]] += p15[flare_id]
        for precision, tol in (("fp32", 2e-3), ("fp16", 2e-2)):
            f = b.folds[k].files[precision]
            logits = ort.InferenceSession(str(f.path), providers=["CPUExecutionProvider"]).run(
                None, {"image": x_runtime})[0]
            probs = torch.softmax(torch.from_numpy(logits), 1)[0].numpy()
            assert np.abs(probs - p13).max() < tol, (k, precision)


@pytest.mark.parametrize("classes, mode, message", [
    (5, "range", "only FLARE23 models convert"),
    (13, "meanstd", "normalize_mode 'meanstd'"),
])
def test_auto3dseg_refuses_what_it_cannot_convert(tmp_path: Path, classes: int, mode: str, message: str) -> None:
    from flare.export import export_auto3dseg

    work, _ = _work_dir(tmp_path / "work", classes=classes, mode=mode)
    with pytest.raises(InputError, match=message):
        export_auto3dseg(work, tmp_path / "bundle", progress=False)
    assert not (tmp_path / "bundle").exists()


def test_auto3dseg_wrong_weights_and_layout(tmp_path: Path) -> None:
    import torch
    from flare.export import export_auto3dseg

    with pytest.raises(InputError, match="no segresnet_<fold> folders"):
        export_auto3dseg(tmp_path, tmp_path / "bundle", progress=False)
    work, _ = _work_dir(tmp_path / "work", classes=13)
    torch.save({"state_dict": _net(13, False, 0).state_dict() | {"extra.weight": torch.zeros(1)}},
               work / "segresnet_0" / "model" / "model.pt")
    with pytest.raises(InputError, match="weights do not fit"):
        export_auto3dseg(work, tmp_path / "bundle", progress=False)
