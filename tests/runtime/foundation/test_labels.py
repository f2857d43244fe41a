"""The label registry's colours and names (the one colour source of previews, DICOM-SEG, RTSTRUCT and label
tables)."""

from __future__ import annotations

import itertools

import pytest
from flare.runtime.foundation.labels import LABELS, delta_e76, label_named, srgb_to_lab


def test_every_pair_of_label_colours_differs_by_delta_e_25() -> None:
    pairs = [(delta_e76(a.color, b.color), a.file, b.file) for a, b in itertools.combinations(LABELS[1:], 2)]
    assert len(pairs) == 14 * 13 // 2
    worst = min(pairs)
    assert worst[0] >= 25.0, worst


def test_lab_conversion_matches_known_values() -> None:
    # CIELAB (D65) of sRGB white, black and pure red (CIE reference values)
    assert srgb_to_lab((255, 255, 255)) == pytest.approx((100.0, 0.0, 0.0), abs=0.01)
    assert srgb_to_lab((0, 0, 0)) == pytest.approx((0.0, 0.0, 0.0), abs=0.01)
    assert srgb_to_lab((255, 0, 0)) == pytest.approx((53.24, 80.09, 67.20), abs=0.05)


def test_totalsegmentator_names_resolve_and_unknown_names_list_the_valid_ones() -> None:
    # TotalSegmentator v2 'total' task file names of these organs
    expected = {1: "liver", 2: "kidney_right", 3: "spleen", 4: "pancreas", 5: "aorta", 6: "inferior_vena_cava",
                7: "adrenal_gland_right", 8: "adrenal_gland_left", 9: "gallbladder", 10: "esophagus", 11: "stomach",
                12: "duodenum", 13: "kidney_left"}
    assert {lab.id: lab.file for lab in LABELS[1:14]} == expected
    assert len({lab.file for lab in LABELS}) == len(LABELS)
    for name in ("kidney_left", "kidney_l", "left kidney", "Kidney-Left"):
        assert label_named(name).id == 13
    with pytest.raises(KeyError) as err:
        label_named("colon")
    assert "colon" in err.value.args[0] and "inferior_vena_cava" in err.value.args[0]


def test_merged_class_names_drop_the_side_of_merged_pairs() -> None:
    from flare.runtime.foundation.labels import MERGED_TUMOR, NUM_MERGED_CLASSES, merged_name

    names = [merged_name(i) for i in range(NUM_MERGED_CLASSES)]
    assert names[2] == "kidney" and names[7] == "adrenal gland" and names[3] == "spleen"
    assert names[11] == "duodenum" and names[MERGED_TUMOR] == "tumor"  # index 12 is the tumor, not FLARE id 12
    assert len(set(names)) == NUM_MERGED_CLASSES
