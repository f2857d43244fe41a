"""End-to-end `segment` on real CTs in unusual but valid forms: every variant must come back in its own geometry,
and variants that hold the same voxels in another layout must give the same labels voxel for voxel."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from flare.runtime import Segmenter, SegmentResult
from flare.runtime.app.write import Outputs, write_result
from flare.runtime.image.model import from_array
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform


def _segment_and_write(segmenter: Segmenter, path: Path, out: Path) -> SegmentResult:
    """The pipeline's result, written the way flare-run writes it (the app layer's writer)."""
    result = segmenter.segment(path)
    write_result(result, Outputs(out))
    return result


@pytest.fixture(scope="module")
def segmenter(tiny_bundle: Path) -> Segmenter:
    return Segmenter(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def abdomen(segmenter: Segmenter) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(data_path("ts_abdomen_ct_3mm.nii.gz"))
    labels = segmenter.segment(img.get_filename()).labels
    assert labels.shape == img.shape and labels.dtype == np.uint8
    assert len(np.unique(labels)) > 2, "the tiny random nets should predict several classes"
    return img, labels


def _reoriented(img: nib.Nifti1Image, codes: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    src = nib.io_orientation(img.affine)
    xform = ornt_transform(src, axcodes2ornt(codes))
    data = apply_orientation(np.asarray(img.dataobj), xform)
    affine = img.affine @ inv_ornt_aff(xform, img.shape)
    return nib.Nifti1Image(data, affine), xform


@pytest.mark.parametrize("codes", ["LPS", "SAR", "PIL", "ILA"])
def test_orientation_and_axis_order_equivariance(segmenter, abdomen, tmp_path: Path, codes: str) -> None:
    img, ref = abdomen
    moved, xform = _reoriented(img, codes)
    path = tmp_path / f"ct_{codes}.nii.gz"
    nib.save(moved, path)
    out = tmp_path / "seg.nii.gz"
    labels = _segment_and_write(segmenter, path, out).labels
    assert labels.flags.f_contiguous  # NIfTI's voxel order in the input grid: the writer copies without transposing
    written = nib.load(out)
    assert written.shape == moved.shape and nib.aff2axcodes(written.affine) == tuple(codes)
    np.testing.assert_allclose(written.affine, moved.affine, atol=1e-5)
    assert (labels == apply_orientation(ref, xform)).all()


@pytest.mark.parametrize("dtype, slope, inter", [(np.int32, 1.0, 0.0), (np.float32, 1.0, 0.0), (np.float64, 1.0, 0.0),
                                                 (np.int16, 2.0, -1024.0), (np.uint16, 1.0, -1024.0),
                                                 (np.int8, 16.0, -1024.0)])
def test_dtypes_with_scaling(segmenter, abdomen, tmp_path: Path, dtype, slope: float, inter: float) -> None:
    img, ref = abdomen
    hu = np.asarray(img.dataobj).astype(np.float64)
    stored = np.round((hu - inter) / slope)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        stored = np.clip(stored, info.min, info.max)
    new = nib.Nifti1Image(stored.astype(dtype), img.affine)
    new.header.set_slope_inter(slope, inter)
    path = tmp_path / "ct.nii"
    nib.save(new, path)
    labels = segmenter.segment(path).labels
    assert labels.shape == img.shape
    if slope == 1.0 and info is None or dtype == np.int32:
        assert (labels == ref).all()  # the same HU values give the same labels
    else:  # quantised HU: nearly the same
        assert (labels == ref).mean() > 0.95


def test_single_volume_4d_and_uncompressed(segmenter, abdomen, tmp_path: Path) -> None:
    img, ref = abdomen
    four = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine)
    nib.save(four, tmp_path / "ct4d.nii")
    out = tmp_path / "seg.nii"
    labels = _segment_and_write(segmenter, tmp_path / "ct4d.nii", out).labels
    assert (labels == ref).all() and nib.load(out).shape == img.shape


def test_thick_slices_small_image_and_oblique(segmenter, tmp_path: Path, caplog) -> None:
    img = nib.load(data_path("ts_body_ct_3mm_int32.nii.gz"))
    data = np.asarray(img.dataobj)[:, :, ::4]  # 12 mm slices
    affine = img.affine.copy()
    affine[:3, 2] *= 4
    result = segmenter.segment(from_array(data, affine))
    assert result.labels.shape == data.shape and result.report.input["spacing"][2] == pytest.approx(12.0)
    tiny = np.asarray(img.dataobj)[40:60, 30:50, 50:58]  # smaller than one tile in every axis
    labels = segmenter.segment(from_array(tiny, img.affine)).labels
    assert labels.shape == tiny.shape
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0, 0], [np.sin(theta), np.cos(theta), 0, 0], [0, 0, 1, 0],
                    [0, 0, 0, 1]])
    oblique = nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine)
    nib.save(oblique, tmp_path / "oblique.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flare.runtime"):
        report = _segment_and_write(segmenter, tmp_path / "oblique.nii.gz", tmp_path / "o.nii.gz").report
    assert report.input["oblique"] and any("oblique" in r.message for r in caplog.records)
    np.testing.assert_allclose(nib.load(tmp_path / "o.nii.gz").affine, oblique.affine, atol=1e-5)


def test_nan_voxels_are_replaced_with_warning(segmenter, tmp_path: Path, caplog) -> None:
    img = nib.load(data_path("ts_abdomen_ct_3mm.nii.gz"))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, :5] = np.nan
    data[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), tmp_path / "nan.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flare.runtime"):
        labels = segmenter.segment(tmp_path / "nan.nii.gz").labels
    assert labels.shape == data.shape
    assert any("nan" in r.message.lower() for r in caplog.records)


def test_folds_and_overlap_options(tiny_bundle: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    seg = Segmenter(tiny_bundle, device="cpu", folds=1, overlap=0.5)
    report = seg.segment(ct).report
    assert report.folds == 1 and report.tiles["blend"] == "gaussian" and report.tiles["overlap"] == 0.5
    from flare.runtime.foundation.errors import BundleError

    with pytest.raises(BundleError, match="has 2 fold"):
        Segmenter(tiny_bundle, device="cpu", folds=3)


def test_postprocess_mode_is_wired_and_reported(tiny_bundle: Path, segmenter: Segmenter) -> None:
    from flare.runtime import postprocess, segment, split_left_right
    from flare.runtime.foundation.errors import BundleError
    from flare.runtime.foundation.labels import merged_to_flare

    assert segmenter.postprocess_mode == "paper"  # the bundle's default
    strict = Segmenter(tiny_bundle, device="cpu", postprocess="strict")
    # each mode's post-processing stage is exactly postprocess() of that mode after the left/right split
    merged = np.random.default_rng(0).integers(0, 13, (24, 20, 40)).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    outs = {}
    for seg in (segmenter, strict):
        expected = postprocess(split_left_right(merged_to_flare(merged), affine), (2.0, 2.0, 2.0),
                               mode=seg.postprocess_mode)
        outs[seg.postprocess_mode] = seg._postprocess(merged.copy(), affine)
        np.testing.assert_array_equal(outs[seg.postprocess_mode], expected)
    assert not np.array_equal(outs["paper"], outs["strict"])
    report = segment(data_path("ts_abdomen_ct_3mm.nii.gz"), tiny_bundle, device="cpu", postprocess="strict").report
    assert report.postprocess == {"mode": "strict"} and report.to_json()["postprocess"] == {"mode": "strict"}
    with pytest.raises(BundleError, match="postprocess mode must be one of paper, strict"):
        Segmenter(tiny_bundle, device="cpu", postprocess="loose")


def test_grouped_design_through_the_segmenter_gives_the_resident_labels(tiny_bundle: Path) -> None:
    """The memory plan's grouped design (one fold session at a time, forced here: on the CPU the plan keeps every
    fold resident) gives the resident design's labels, says so in the report, and never holds two fold sessions."""
    from flare.runtime.inference.memory_plan import Design
    from flare.runtime.inference.sessions import FoldSessions

    seg = Segmenter(tiny_bundle, device="cpu")
    image = data_path("ts_abdomen_ct_3mm.nii.gz")
    resident = seg.segment(image)
    assert resident.report.backend["design"]["name"] == "resident"
    pool = seg.engines
    assert isinstance(pool, FoldSessions) and len(pool.alive()) == len(pool) == 2
    seg.plan.design = Design("grouped", 1, 2, "test", "forced: one fold session at a time")
    grouped = seg.segment(image)
    design = grouped.report.backend["design"]
    assert design["name"] == "grouped" and design["group"] == 1 and design["groups"] == [[0], [1]]
    assert len(pool.alive()) == 1 and pool.dropped >= 1
    assert (grouped.labels == resident.labels).mean() > 0.9995


def test_with_options_shares_the_fold_sessions(tiny_bundle: Path) -> None:
    """flare-serve's per-request --folds: a view on the same sessions, the labels of a one-fold Segmenter."""
    seg = Segmenter(tiny_bundle, device="cpu")
    image = data_path("ts_abdomen_ct_3mm.nii.gz")
    one = seg.with_options(folds=1)
    assert len(one.engines) == 1 and one.engines[0] is seg.engines[0] and len(seg.engines) == 2
    got = one.segment(image)
    ref = Segmenter(tiny_bundle, device="cpu", folds=1).segment(image)
    assert got.report.folds == 1 and (got.labels == ref.labels).all()
