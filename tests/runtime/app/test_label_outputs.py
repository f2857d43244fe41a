"""TotalSegmentator habits of flare-run on the real CTs (the tiny bundle, CPU): ``-i``, ``--roi-subset`` with
several names, ``--masks DIR`` with TotalSegmentator's file names, ``--statistics`` without a path, ``--label-table``,
the one-line warning of a synthetic-data bundle and RTSTRUCT output from a DICOM series."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import assert_clean_failure, flare_run
from conftest import data_path

CT = "ts_abdomen_ct_3mm.nii.gz"


@pytest.fixture(scope="module")
def full_labels(tiny_bundle: Path) -> np.ndarray:
    from flare.runtime.pipeline.segmenter import Segmenter

    labels = Segmenter(tiny_bundle, device="cpu").segment(data_path(CT)).labels
    return labels


def test_ts_style_run(synthetic_bundle: Path, full_labels: np.ndarray, tmp_path: Path) -> None:
    from flare.runtime.foundation.labels import LABELS

    present = [int(v) for v in np.unique(full_labels) if v]
    assert len(present) >= 2, present
    keep = [LABELS[i].file for i in present[:2]]
    out, masks = tmp_path / "seg.nii.gz", tmp_path / "masks"
    proc = flare_run("-i", data_path(CT), "-o", out, "--bundle", synthetic_bundle, "--device", "cpu",
                     "--roi_subset", *keep, "--masks", masks, "--label-table", "--report", tmp_path / "r.json",
                     "--statistics", "-q")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flare-run: warning: ") and "synthetic" in lines[0], lines
    written = np.asarray(nib.load(out).dataobj)
    expected = np.where(np.isin(full_labels, present[:2]), full_labels, 0)
    np.testing.assert_array_equal(written, expected)
    # one mask per asked-for label, TotalSegmentator's names, in the input's space
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{k}.nii.gz" for k in keep)
    for label_id, name in zip(present[:2], keep):
        m = nib.load(masks / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(m.dataobj), (full_labels == label_id).astype(np.uint8))
        assert np.allclose(m.affine, nib.load(out).affine)
    # statistics beside the output, label tables beside the output
    stats = json.loads((tmp_path / "seg_stats.json").read_text())
    assert stats["segmentation"] == str(out)
    ctbl = (tmp_path / "seg.ctbl").read_text().splitlines()
    assert ctbl[0].startswith("# Color table file") and "13 kidney_left 90 60 200 255" in ctbl
    itk = (tmp_path / "seg.itksnap.txt").read_text()
    assert "ITK-SnAP Label Description File" in itk and '"left kidney"' in itk
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model_card"]["data"] == "synthetic" and "synthetic" in report["model_card"]["warning"]
    assert report["roi_subset"] == present[:2]


def test_masks_of_all_labels_and_folder_mode_summary(synthetic_bundle: Path, tmp_path: Path) -> None:
    from flare.runtime.foundation.labels import LABELS

    cases = tmp_path / "cases"
    cases.mkdir()
    for name in (CT, "ts_torso_ct_1p5mm_lps.nii.gz"):
        (cases / name).symlink_to(data_path(name))
    out, masks = tmp_path / "out", tmp_path / "masks"
    proc = flare_run(cases, "-o", out, "--bundle", synthetic_bundle, "--device", "cpu", "--masks", masks,
                     "--statistics", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sum("warning" in ln for ln in proc.stderr.splitlines()) == 1, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 2 and "synthetic" in summary["model_warning"]
    for case in ("ts_abdomen_ct_3mm", "ts_torso_ct_1p5mm_lps"):
        assert sorted(p.name for p in (masks / case).iterdir()) == sorted(f"{lab.file}.nii.gz" for lab in LABELS[1:])
        assert (out / f"{case}_stats.json").is_file()


def test_roi_subset_unknown_name_and_device_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    proc = flare_run(data_path(CT), "-o", out, "--bundle", tiny_bundle, "--roi-subset", "colon")
    assert_clean_failure(proc, "--roi-subset", "colon", "kidney_left", "inferior_vena_cava")
    for spec, words in (("cuda:x", ("unknown device", "cuda:N")), ("tpu", ("unknown device",)),
                        ("gpu:1", ("cuda",))):
        proc = flare_run(data_path(CT), "-o", out, "--bundle", tiny_bundle, "--device", spec)
        assert_clean_failure(proc, "flare-run: error:", *words)
    assert not out.exists()


def test_rtstruct_from_a_dicom_series(synthetic_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("rt_utils")
    pydicom = pytest.importorskip("pydicom")
    from dicom_series import write_ct_series
    from flare.runtime.image.nifti import read_image

    img = read_image(data_path(CT))
    series = tmp_path / "series"
    write_ct_series(series, img.data, img.affine, rng=np.random.default_rng(5))
    out = tmp_path / "ct.rtstruct.dcm"
    proc = flare_run(series, "-o", out, "--bundle", synthetic_bundle, "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and "SYNTHETIC" in ds.SeriesDescription
    assert len(ds.StructureSetROISequence) >= 1
    # RTSTRUCT needs DICOM input: a NIfTI input is refused before any work
    proc = flare_run(data_path(CT), "-o", tmp_path / "x.rtstruct.dcm", "--bundle", synthetic_bundle)
    assert_clean_failure(proc, "x.rtstruct.dcm", "RTSTRUCT", "DICOM input")


def test_masks_never_replace_an_input_or_another_output(tiny_bundle: Path, tmp_path: Path) -> None:
    """--masks files are outputs like the others: onto the input CT, onto -o, onto a FIFO, a --masks folder at an
    output's path, or (in a batch) one case's mask folder at another case's output or at summary.json: one line,
    exit 2, before any work, nothing touched."""
    import os
    import shutil

    d = tmp_path / "d"
    d.mkdir()
    ct = d / "liver.nii.gz"  # a CT that happens to carry a mask's name, in the folder given to --masks
    shutil.copy(data_path(CT), ct)
    before = ct.read_bytes()
    fifo = tmp_path / "f"
    fifo.mkdir()
    os.mkfifo(fifo / "liver.nii.gz")
    batch = tmp_path / "batch"
    batch.mkdir()
    for name in ("b.nii.gz", "b.nii.gz.nii.gz"):
        (batch / name).symlink_to(data_path(CT))
    batch2 = tmp_path / "batch2"
    batch2.mkdir()
    (batch2 / "summary.json.nii.gz").symlink_to(data_path(CT))
    cases = [([ct, "-o", tmp_path / "seg.nii.gz", "--masks", d], "is the input"),
             ([data_path(CT), "-o", tmp_path / "o" / "liver.nii.gz", "--masks", tmp_path / "o"], "same file"),
             ([data_path(CT), "-o", tmp_path / "m.nii.gz", "--masks", fifo], "not a regular file"),
             ([data_path(CT), "-o", tmp_path / "m2.nii.gz", "--masks", tmp_path / "m2.nii.gz"], "--masks folder is"),
             ([batch, "-o", tmp_path / "segs", "--masks", tmp_path / "segs"], "--masks folder is"),
             ([batch2, "-o", tmp_path / "segs2", "--masks", tmp_path / "segs2"], "--masks folder is")]
    (tmp_path / "o").mkdir()
    for args, words in cases:
        proc = flare_run(*args, "--bundle", tiny_bundle, "--device", "cpu", "-q")
        assert_clean_failure(proc, "flare-run: error:", words)
    assert ct.read_bytes() == before and (fifo / "liver.nii.gz").is_fifo()
    assert not any((tmp_path / n).exists() for n in ("seg.nii.gz", "m.nii.gz", "m2.nii.gz", "segs", "segs2"))
    assert list((tmp_path / "o").iterdir()) == []


def test_a_symlink_loop_is_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").symlink_to(tmp_path / "b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    proc = flare_run(tmp_path / "a.nii.gz", "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "--device", "cpu")
    assert_clean_failure(proc, "a.nii.gz", "symbolic link")
