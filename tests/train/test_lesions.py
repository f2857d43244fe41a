"""Lesion copy-paste (``augment.lesion_paste_prob``): which tumours are banked, what a paste does to the image, the
label and the crop centres, and that the paper's default leaves the pipeline as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.errors import InputError
from flare.train.config import load_config, role_config
from flare.train.data import augment_transform
from flare.train.lesions import RandLesionPasted, harvest, jittered, paste

SHAPE = (40, 40, 40)
LIVER_LEVEL, KIDNEY_LEVEL, CONTRAST = 0.6, 0.7, -0.08  # 0..1 image: +-250 HU window -> 0.08 = 40 HU


def _case(tumour: bool, rng: np.random.Generator) -> dict:
    """A volume with a liver block (left half) and a right-kidney block (right half), noise 0.01; optionally a
    hypodense sphere of radius 4 in the liver and a hyperdense one in fat (unlabelled tissue)."""
    image = np.full(SHAPE, 0.3, np.float32)
    label = np.zeros(SHAPE, np.uint8)
    image[4:36, 4:20, 4:36], label[4:36, 4:20, 4:36] = LIVER_LEVEL, L.LIVER
    image[4:36, 22:36, 4:36], label[4:36, 22:36, 4:36] = KIDNEY_LEVEL, L.RIGHT_KIDNEY
    if tumour:
        zz, yy, xx = np.ogrid[:40, :40, :40]
        ball = (zz - 20) ** 2 + (yy - 12) ** 2 + (xx - 20) ** 2 <= 16
        image[ball] += CONTRAST
        label[ball] = L.TUMOR
        fat = (zz - 20) ** 2 + (yy - 38) ** 2 + (xx - 38) ** 2 <= 1  # in fat, at the corner: never banked
        image[fat], label[fat] = 0.9, L.TUMOR
    image += rng.normal(0, 0.01, SHAPE).astype(np.float32)
    indices = [torch.as_tensor(np.flatnonzero(label == c)) for c in range(L.NUM_FLARE_IDS)]
    return {"image": torch.as_tensor(image[None]), "label": torch.as_tensor(label[None]), "label_cls_indices": indices}


def test_harvest_banks_tumours_in_host_organs_with_their_contrast(monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case(True, np.random.default_rng(0))
    lesions = harvest(case["image"][0].numpy(), case["label"][0].numpy())
    assert len(lesions) == 1  # the liver tumour; the one in fat has no host organ
    lesion = lesions[0]
    assert lesion.mask.sum() == int((case["label"][0] == L.TUMOR).sum()) - 7
    assert lesion.level == pytest.approx(LIVER_LEVEL, abs=0.01)
    assert float(lesion.image[lesion.mask].mean() - lesion.level) == pytest.approx(CONTRAST, abs=0.01)
    assert not (lesion.mask & lesion.shell).any()
    monkeypatch.setattr("flare.train.lesions.MAX_PATCH_VOXELS", 12**3)  # the lesion's patch is 13 voxels a side
    assert harvest(case["image"][0].numpy(), case["label"][0].numpy()) == []  # too large for the bank: skipped


def test_paste_keeps_the_contrast_on_the_destination_host() -> None:
    rng = np.random.default_rng(1)
    source = _case(True, rng)
    lesion = harvest(source["image"][0].numpy(), source["label"][0].numpy())[0]
    dest = _case(False, rng)
    image, label = dest["image"][0].numpy().copy(), dest["label"][0].numpy().copy()
    placed = paste(image, label, lesion, (20, 29, 20), L.RIGHT_KIDNEY)
    assert placed is not None and len(placed) == lesion.mask.sum()
    assert set(label.flat[placed].tolist()) == {L.TUMOR} and (label == L.TUMOR).sum() == len(placed)
    assert float(image.flat[placed].mean()) == pytest.approx(KIDNEY_LEVEL + CONTRAST, abs=0.015)
    assert paste(image.copy(), label.copy(), lesion, (1, 29, 20), L.RIGHT_KIDNEY) is None  # off the volume
    assert paste(image.copy(), label.copy(), lesion, (20, 29, 20), L.SPLEEN) is None  # no spleen around it


def test_transform_pastes_banked_tumours_and_adds_crop_centres() -> None:
    rng = np.random.default_rng(2)
    source, dest = _case(True, rng), _case(False, rng)

    def run(seed: int) -> tuple[RandLesionPasted, dict]:
        t = RandLesionPasted(1.0)
        t.set_random_state(seed)
        assert len(t(dest)["label_cls_indices"][L.TUMOR]) == 0  # nothing banked yet: nothing to paste
        t(source)
        t(source)
        assert len(t.bank) == 1  # the liver tumour, banked once
        return t, t(dest)

    t, out = run(7)
    tumour = out["label"][0] == L.TUMOR
    assert int(tumour.sum()) == t.bank[0].mask.sum()
    assert torch.equal(torch.sort(out["label_cls_indices"][L.TUMOR]).values, torch.nonzero(tumour.flatten())[:, 0])
    assert int((dest["label"][0] == L.TUMOR).sum()) == 0  # the input item is not modified
    assert torch.equal(run(7)[1]["image"], out["image"])  # same seed, same paste
    never = RandLesionPasted(0.0)
    never(source)
    assert torch.equal(never(dest)["image"], dest["image"])


def test_jitter_resizes_the_tumour_and_scales_its_contrast() -> None:
    case = _case(True, np.random.default_rng(4))
    lesion = harvest(case["image"][0].numpy(), case["label"][0].numpy())[0]
    big = jittered(lesion, [1.5, 1.2, 1.0], 0.5)
    assert big is not None
    assert big.mask.sum() / lesion.mask.sum() == pytest.approx(1.5 * 1.2, rel=0.15)
    assert big.level == lesion.level and not (big.mask & big.shell).any()
    assert big.shell.sum() > lesion.shell.sum()  # rebuilt around the larger tumour
    assert float(big.image[big.mask].mean() - big.level) == pytest.approx(0.5 * CONTRAST, abs=0.01)
    same_size = jittered(lesion, None, 1.25)
    assert same_size is not None and np.array_equal(same_size.mask, lesion.mask)
    assert float(same_size.image[lesion.mask].mean() - lesion.level) == pytest.approx(1.25 * CONTRAST, abs=0.01)
    assert jittered(lesion, [0.1, 0.1, 0.1]) is None  # under MIN_VOXELS: not pasted


def test_jittered_pastes_differ_from_plain_ones_and_stay_seeded() -> None:
    rng = np.random.default_rng(5)
    source, dest = _case(True, rng), _case(False, rng)

    def pasted(**jitter: list[float]) -> torch.Tensor:
        """The first paste that fits (a random centre near the volume's edge does not)."""
        t = RandLesionPasted(1.0, **jitter)
        t.set_random_state(11)
        t(source)
        for _ in range(50):
            tumour = t(dest)["label"][0] == L.TUMOR
            if tumour.any():
                return tumour
        raise AssertionError("no paste fitted in 50 draws")

    plain, sized = pasted(), pasted(scale=[1.4, 1.5])
    assert int(sized.sum()) > int(plain.sum()) * 1.8
    assert torch.equal(pasted(scale=[1.4, 1.5]), sized)


def test_config_switch_and_checks() -> None:
    paper = role_config(load_config("tiny"), "fold")
    names = [type(x).__name__ for x in augment_transform(paper).transforms]
    assert "RandLesionPasted" not in names  # the paper's default: not in the pipeline at all
    on = role_config(load_config("tiny", {"augment": {"lesion_paste_prob": 0.5}}), "fold")
    assert type(augment_transform(on).transforms[0]).__name__ == "RandLesionPasted"
    locator = role_config(load_config("tiny", {"augment": {"lesion_paste_prob": 0.5}}), "locator")
    assert "RandLesionPasted" not in [type(x).__name__ for x in augment_transform(locator).transforms]
    with pytest.raises(InputError, match="lesion_paste_prob must lie in"):
        augment_transform(role_config(load_config("tiny", {"augment": {"lesion_paste_prob": 2}}), "fold"))
    with pytest.raises(InputError, match="lesion_hosts must be organ ids"):
        augment_transform(role_config(load_config("tiny", {"augment": {"lesion_paste_prob": 0.5,
                                                                       "lesion_hosts": [14]}}), "fold"))
    for bad in ([1.2, 0.8], [0, 1], "big", [1.0]):
        with pytest.raises(InputError, match="lesion_scale must be"):
            augment_transform(role_config(load_config("tiny", {"augment": {"lesion_paste_prob": 0.5,
                                                                           "lesion_scale": bad}}), "fold"))


def test_pasted_tumours_reach_the_training_crops() -> None:
    """Through the whole augmentation: after a case with a tumour, crops of a case without one hold tumour (merged
    class) when the crop ratios centre every crop on the tumour class."""
    ratios = [0.0] * L.NUM_FLARE_IDS
    ratios[L.TUMOR] = 1.0
    eff = role_config(load_config("tiny", {"roi": [16, 16, 16], "train": {"num_crops": 2, "crop_ratios": ratios},
                                           "augment": {"lesion_paste_prob": 1.0}}), "fold")
    xform = augment_transform(eff)
    xform.set_random_state(3)
    rng = np.random.default_rng(3)
    xform(_case(True, rng))
    crops = xform(_case(False, rng))
    assert len(crops) == 2 and all(bool((c["label"] == L.MERGED_TUMOR).any()) for c in crops)
