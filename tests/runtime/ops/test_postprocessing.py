"""flare.runtime.ops.postprocessing: the paper's rules (default) and the strict 3-D rules (``mode="strict"``)."""

from __future__ import annotations

import pkgutil

import flare.runtime
import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from flare.runtime.foundation.labels import (
    AORTA,
    GALLBLADDER,
    IVC,
    LARGEST_COMPONENT_IDS,
    LEFT_ADRENAL,
    LEFT_KIDNEY,
    LIVER,
    PANCREAS,
    RIGHT_ADRENAL,
    RIGHT_KIDNEY,
    SPLEEN,
    STOMACH,
    TUMOR,
    Z_RUN_IDS,
)
from flare.runtime.ops import postprocessing
from flare.runtime.ops.lr_split import split_left_right
from flare.runtime.ops.postprocessing import (
    array_module,
    keep_largest_z_run,
    keep_largest_z_run_per_organ,
    largest_run,
    postprocess,
    remove_tumor_if_small,
)
from scipy import ndimage

SHAPE = (40, 40, 80)
ONE_MM = (1.0, 1.0, 1.0)


def _blank() -> np.ndarray:
    return np.zeros(SHAPE, np.uint8)


# ------------------------------------------------------------------------------------------- the public function
def test_package_attribute_is_the_function_not_a_module() -> None:
    from flare.runtime import postprocess as exported

    assert callable(exported) and exported is postprocessing.postprocess
    assert flare.runtime.postprocess is postprocessing.postprocess  # after the submodule was imported, too
    # no submodule may shadow a public name: importing it would replace the package attribute
    submodules = {m.name for m in pkgutil.iter_modules(flare.runtime.__path__)}
    assert not submodules & set(flare.runtime.__all__), submodules & set(flare.runtime.__all__)


def test_paper_is_the_default_mode_and_modes_are_checked() -> None:
    assert postprocessing.DEFAULT_MODE == "paper" and postprocessing.MODES == ("paper", "strict")
    labels = _blank()
    labels[0:20, 0:20, 10:40] = LIVER
    labels[0:5, 30:35, 10:12] = LIVER  # in-plane fragment: the paper keeps it, strict does not
    np.testing.assert_array_equal(postprocess(labels, ONE_MM), postprocess(labels, ONE_MM, mode="paper"))
    assert np.count_nonzero(postprocess(labels, ONE_MM, mode="strict") == LIVER) == 20 * 20 * 30
    with pytest.raises(ValueError, match="paper, strict"):
        postprocess(labels, ONE_MM, mode="loose")


def test_z_rule_organs_come_from_the_registry() -> None:
    assert Z_RUN_IDS == (LIVER, RIGHT_KIDNEY, SPLEEN, PANCREAS, AORTA, LEFT_KIDNEY)


# ------------------------------------------------------------------------------------------- paper: tumor rule
def test_paper_tumor_rule_counts_the_total_not_components() -> None:
    labels = _blank()
    for x in (0, 10, 20):  # three separate 40-voxel tumors: 120 voxels in total >= 100 -> all kept
        labels[x:x + 2, 0:4, 0:5] = TUMOR
    out = postprocess(labels, ONE_MM)
    np.testing.assert_array_equal(out, labels)
    # strict judges each component: every one of them is under 100 voxels
    assert np.count_nonzero(postprocess(labels, ONE_MM, mode="strict")) == 0

    single = _blank()
    single[5:8, 5:8, 0:10] = TUMOR  # one 90-voxel tumor -> removed
    single[20:25, 20:25, 0:5] = LIVER
    out = postprocess(single, ONE_MM)
    assert np.count_nonzero(out == TUMOR) == 0
    assert np.count_nonzero(out == LIVER) == 125


def test_paper_tumor_threshold_is_exact_and_scales_with_voxel_volume() -> None:
    def kept(n_voxels: int, spacing: tuple[float, float, float], **kw: int) -> bool:
        labels = _blank().reshape(-1)
        labels[:n_voxels] = TUMOR
        return bool(np.count_nonzero(postprocess(labels.reshape(SHAPE), spacing, **kw)))

    assert not kept(99, ONE_MM) and kept(100, ONE_MM)
    # 2 mm³ voxels: 49 voxels = 98 mm³ go, 50 voxels = 100 mm³ stay
    assert not kept(49, (2.0, 1.0, 1.0)) and kept(50, (2.0, 1.0, 1.0))
    # 0.5 mm isotropic, 0.125 mm³ voxels: 800 voxels are the threshold
    assert not kept(799, (0.5, 0.5, 0.5)) and kept(800, (0.5, 0.5, 0.5))
    assert kept(1, ONE_MM, min_tumor_voxels=0)
    with pytest.raises(ValueError, match="spacing"):
        remove_tumor_if_small(_blank(), (1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------- paper: z rule
def _paper_phantom() -> np.ndarray:
    labels = _blank()
    labels[0:20, 0:20, 10:40] = LIVER  # liver's main run: z 10..39
    labels[0:4, 36:40, 20:22] = LIVER  # in-plane fragment on kept liver slices: stays
    labels[10:14, 10:14, 70:73] = LIVER  # stray liver 30 slices above its run: cleared
    labels[25:35, 25:35, 60:78] = SPLEEN  # spleen lies only where the stray liver is: its own run, untouched
    labels[22:24, 0:2, 0:50] = AORTA  # aorta: 50 slices, 200 voxels -> kept (most slices)...
    labels[30:40, 0:10, 55:59] = AORTA  # ...over a 4-slice, 400-voxel blob, which is cleared
    labels[20:25, 30:35, 0:3] = STOMACH  # not a z-rule organ: both pieces stay
    labels[20:25, 30:35, 50:53] = STOMACH
    labels[36:38, 20:22, 0:2] = GALLBLADDER
    labels[30:33, 12:15, 30:45] = TUMOR  # 135 voxels: stays
    return labels


def test_paper_z_rule_each_organ_on_its_own() -> None:
    labels = _paper_phantom()
    out = postprocess(labels, ONE_MM)
    expected = labels.copy()
    expected[10:14, 10:14, 70:73] = 0  # stray liver
    expected[30:40, 0:10, 55:59] = 0  # the aorta's short run, although it holds more voxels
    np.testing.assert_array_equal(out, expected)


def test_paper_keeps_other_labels_and_in_plane_fragments() -> None:
    labels = _paper_phantom()
    out = postprocess(labels, ONE_MM)
    others = ~np.isin(labels, Z_RUN_IDS)
    np.testing.assert_array_equal(out[others], labels[others])
    np.testing.assert_array_equal(out[0:4, 36:40, 20:22], LIVER)
    np.testing.assert_array_equal(out[25:35, 25:35, 60:78], SPLEEN)
    # the strict rules on the same map: the in-plane liver fragment goes, and the organ-union z pass removes the
    # spleen (it sits in a separate run of organ slices from the much larger liver run)
    strict = postprocess(labels, ONE_MM, mode="strict")
    assert np.count_nonzero(strict[0:4, 36:40, 20:22]) == 0
    assert np.count_nonzero(strict == SPLEEN) == 0


def test_paper_z_rule_returns_removed_count_and_follows_z_axis() -> None:
    labels = _paper_phantom()
    moved = np.ascontiguousarray(np.moveaxis(labels, 2, 0))
    removed = keep_largest_z_run_per_organ(moved, z_axis=0)
    assert removed == 4 * 4 * 3 + 10 * 10 * 4
    np.testing.assert_array_equal(np.moveaxis(moved, 0, 2), postprocess(labels, ONE_MM))
    # organs=() switches the rule off
    np.testing.assert_array_equal(postprocess(labels, ONE_MM, organs=()), labels)
    # organs narrowed to the liver: the aorta blob stays
    assert np.count_nonzero(postprocess(labels, ONE_MM, organs=(LIVER,)) == AORTA) == 200 + 400


def test_largest_run_ties_go_to_more_voxels_then_to_the_first() -> None:
    occupied = np.zeros(30, bool)
    occupied[2:7] = True
    occupied[10:12] = True
    occupied[20:25] = True
    assert largest_run(occupied) == (2, 7)  # tie on length, no voxel counts: the first
    assert largest_run(occupied, lambda a, b: 5 if a == 20 else 3) == (20, 25)
    assert largest_run(occupied, lambda a, b: 4) == (2, 7)
    assert largest_run(np.zeros(5, bool)) is None
    assert largest_run(np.ones(5, bool)) == (0, 5)

    labels = _blank()
    labels[0:2, 0:2, 0:5] = PANCREAS  # 20 voxels on 5 slices
    labels[10:20, 10:20, 30:35] = PANCREAS  # 500 voxels on 5 slices: the tie goes to this run
    labels[30:32, 30:32, 60:65] = RIGHT_KIDNEY  # two equal runs of the right kidney: the first (inferior) stays
    labels[30:32, 30:32, 70:75] = RIGHT_KIDNEY
    out = postprocess(labels, ONE_MM)
    assert np.count_nonzero(out[..., 0:5]) == 0 and np.all(out[10:20, 10:20, 30:35] == PANCREAS)
    assert np.all(out[30:32, 30:32, 60:65] == RIGHT_KIDNEY) and np.count_nonzero(out[..., 70:75]) == 0


def test_paper_mode_runs_on_the_arrays_own_module_numpy() -> None:
    """The paper mode is array-API code: on a numpy map every step stays numpy (CuPy maps go the same path on the
    GPU; tests/runtime/inference/test_gpu_runtime.py runs it there when a GPU is at hand)."""
    labels = _paper_phantom()
    assert array_module(labels) is np
    out = postprocess(labels, ONE_MM, copy=True)
    assert type(out) is np.ndarray and out.dtype == np.uint8 and out.shape == SHAPE
    same = postprocess(labels, ONE_MM, copy=False)
    assert same is labels
    np.testing.assert_array_equal(same, out)
    # a non-contiguous view is edited in place through the view
    base = np.zeros((SHAPE[0], SHAPE[1], 2 * SHAPE[2]), np.uint8)
    base[..., ::2] = _paper_phantom()
    base[..., 1::2] = IVC
    view = base[..., ::2]
    assert not view.flags.c_contiguous
    postprocess(view, ONE_MM, copy=False)
    np.testing.assert_array_equal(base[..., ::2], out)
    np.testing.assert_array_equal(base[..., 1::2], IVC)


@pytest.mark.parametrize("block_bytes", [1, 40 * 80 * 7, 1 << 30])
def test_paper_mode_blocked_scans_agree(monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    """The numpy scans run over blocks of x rows (one row, seven rows, the whole map): same result."""
    labels = _paper_phantom()
    labels[39, 39, 79] = TUMOR  # tumor voxels in the last block count too: 136 in total
    expected = labels.copy()
    expected[10:14, 10:14, 70:73] = 0
    expected[30:40, 0:10, 55:59] = 0
    monkeypatch.setattr(postprocessing, "HOST_BLOCK_BYTES", block_bytes)
    np.testing.assert_array_equal(postprocess(labels, ONE_MM), expected)
    assert not np.count_nonzero(postprocess(labels, ONE_MM, min_tumor_voxels=137) == TUMOR)
    assert np.count_nonzero(postprocess(labels, ONE_MM, min_tumor_voxels=136) == TUMOR) == 136


# ------------------------------------------------------------------------------------------- strict (old rules)
def test_tumor_threshold_is_exact_at_1mm():
    labels = _blank()
    labels[0:9, 0:11, 0] = TUMOR  # 99 voxels
    labels[20:30, 20:30, 0] = TUMOR  # 100 voxels
    out = postprocess(labels, ONE_MM, mode="strict", z_pass=False)
    assert np.count_nonzero(out[0:9, 0:11, 0]) == 0
    assert np.all(out[20:30, 20:30, 0] == TUMOR)


def test_tumor_threshold_scales_with_voxel_volume():
    labels = _blank()
    labels[0:7, 0:7, 0] = TUMOR  # 49 voxels of 2 mm³ = 98 mm³ -> removed
    labels[20:30, 20:25, 0] = TUMOR  # 50 voxels of 2 mm³ = 100 mm³ -> kept
    out = postprocess(labels, (2.0, 1.0, 1.0), mode="strict", z_pass=False)
    assert np.count_nonzero(out == TUMOR) == 50
    assert np.all(out[20:30, 20:25, 0] == TUMOR)
    # threshold 0 keeps everything
    np.testing.assert_array_equal(postprocess(labels, (2.0, 1.0, 1.0), mode="strict", min_tumor_voxels=0,
                                              z_pass=False), labels)


def test_components_are_26_connected():
    labels = _blank()
    labels[0:5, 0:5, 0:2] = TUMOR  # 50 voxels
    labels[5:10, 5:10, 2:4] = TUMOR  # 50 voxels touching the first by one corner only -> one 100-voxel tumor
    out = postprocess(labels, ONE_MM, mode="strict", z_pass=False)
    np.testing.assert_array_equal(out, labels)


def test_largest_component_per_listed_organ():
    labels = _blank()
    labels[0:10, 0:10, 0:10] = LIVER  # 1000 voxels: kept
    labels[20:25, 20:25, 0:10] = LIVER  # 250: removed
    labels[30:35, 0:5, 0:5] = RIGHT_KIDNEY
    labels[30:33, 10:13, 0:5] = RIGHT_KIDNEY  # smaller right-kidney piece: removed
    labels[0:4, 30:34, 0:5] = LEFT_KIDNEY  # left kidney is its own class: kept
    labels[0:3, 20:23, 12:15] = STOMACH
    labels[10:12, 20:22, 12:15] = STOMACH  # stomach is not in the list: both pieces kept
    labels[30:31, 30:31, 12:13] = TUMOR  # 1 voxel tumor: removed
    out = postprocess(labels, ONE_MM, mode="strict", z_pass=False)
    expected = labels.copy()
    expected[20:25, 20:25, 0:10] = 0
    expected[30:33, 10:13, 0:5] = 0
    expected[30, 30, 12] = 0
    np.testing.assert_array_equal(out, expected)
    # not listed -> untouched
    np.testing.assert_array_equal(postprocess(labels, ONE_MM, mode="strict", organs=(), z_pass=False)
                                  [20:25, 20:25, 0:10], LIVER)
    # the paper's rule keeps both liver pieces (same slices) and the one-voxel tumor goes with the total (1 < 100)
    paper = postprocess(labels, ONE_MM)
    np.testing.assert_array_equal(paper[labels != TUMOR], labels[labels != TUMOR])


def _z_phantom() -> np.ndarray:
    labels = _blank()
    labels[0:20, 0:20, 10:40] = LIVER
    labels[25:30, 0:5, 35:45] = STOMACH  # touches the main run (z 10..44)
    labels[25:30, 25:30, 75:78] = SPLEEN  # island 30 slices above the main run: removed
    labels[0:3, 30:33, 0:3] = STOMACH  # island below: removed
    labels[30:36, 30:36, 70:76] = TUMOR  # far-away tumor (216 voxels): kept
    labels[10:12, 10:12, 44] = TUMOR  # tumor inside the run
    return labels


def test_z_pass_keeps_only_the_main_run_and_never_touches_tumor():
    labels = _z_phantom()
    out = postprocess(labels, ONE_MM, mode="strict", min_tumor_voxels=0, organs=())
    expected = labels.copy()
    expected[25:30, 25:30, 75:78] = 0
    expected[0:3, 30:33, 0:3] = 0
    np.testing.assert_array_equal(out, expected)
    # switched off: nothing removed
    np.testing.assert_array_equal(postprocess(labels, ONE_MM, mode="strict", min_tumor_voxels=0, organs=(),
                                              z_pass=False), labels)
    # the paper's rules leave this map alone: the spleen's only run is its largest, stomach is not a z-rule organ
    np.testing.assert_array_equal(postprocess(labels, ONE_MM, min_tumor_voxels=0), labels)


def test_z_pass_picks_the_run_with_most_organ_voxels_and_follows_z_axis():
    labels = _blank()
    labels[0:2, 0:2, 0:30] = AORTA  # long thin run: 120 voxels
    labels[10:30, 10:30, 40:45] = LIVER  # short thick run: 2000 voxels -> kept
    moved = np.ascontiguousarray(np.moveaxis(labels, 2, 0))
    removed = keep_largest_z_run(moved, z_axis=0)
    assert removed == 120
    assert np.count_nonzero(moved == AORTA) == 0 and np.count_nonzero(moved == LIVER) == 2000


@pytest.mark.parametrize("mode", ["paper", "strict"])
def test_copy_and_in_place_and_dtype(mode: str) -> None:
    labels = _z_phantom()
    labels[0:2, 38:40, 70:72] = IVC
    before = labels.copy()
    out = postprocess(labels, ONE_MM, mode=mode)
    np.testing.assert_array_equal(labels, before)  # default: input untouched
    assert out.dtype == np.uint8
    same = postprocess(labels, ONE_MM, mode=mode, copy=False)
    assert same is labels
    np.testing.assert_array_equal(labels, out)
    with pytest.raises(ValueError):
        postprocess(labels.astype(np.int16), ONE_MM, mode=mode)
    with pytest.raises(ValueError):
        postprocess(labels[..., 0], ONE_MM, mode=mode)


# ------------------------------------------------------------------------------------------- a real label map
def _to_1mm_nearest(data: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Nearest resampling on the project's 'align centres' grid with plain numpy indexing."""
    index = []
    for n_in, sp in zip(data.shape, spacing):
        n_out = max(1, round(n_in * sp))
        index.append(np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1))
    return data[np.ix_(*index)]


@pytest.fixture(scope="module")
def real_1mm() -> tuple[np.ndarray, np.ndarray]:
    """The TotalSegmentator label map at 1 mm (FLARE ids) and its merged-kidney/adrenal split back to FLARE ids."""
    img = nib.load(data_path("ts_abdomen_labels_flare_ids.nii.gz"))
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    data = np.asarray(img.dataobj).astype(np.uint8)
    truth = _to_1mm_nearest(data, spacing)
    scale = np.array(data.shape) / np.array(truth.shape)
    grid = np.eye(4)
    grid[:3, :3] = np.diag(scale)
    grid[:3, 3] = (scale - 1) / 2  # 'align centres' half-voxel shift
    affine = img.affine @ grid
    merged = truth.copy()
    merged[merged == LEFT_KIDNEY] = RIGHT_KIDNEY
    merged[merged == LEFT_ADRENAL] = RIGHT_ADRENAL
    return truth, split_left_right(merged, affine)


def test_real_label_map_paper_mode_keeps_every_organ(real_1mm: tuple[np.ndarray, np.ndarray]) -> None:
    truth, split = real_1mm
    out = postprocess(split, ONE_MM)
    before = np.bincount(truth.ravel(), minlength=15)
    after = np.bincount(out.ravel(), minlength=15)
    for label_id in np.flatnonzero(before[1:]) + 1:
        # every organ of this map is one run of slices, so the paper's rules keep all of it -- also the
        # pancreas that is in two 3-D halves (strict keeps one half, below)
        assert after[label_id] >= 0.98 * before[label_id], (label_id, before[label_id], after[label_id])
    np.testing.assert_array_equal(out, split)
    assert np.all(out[out != 0] == truth[out != 0])  # only removals, no relabelling errors


def test_real_label_map_strict_mode_keeps_largest_components(real_1mm: tuple[np.ndarray, np.ndarray]) -> None:
    truth, split = real_1mm
    out = postprocess(split, ONE_MM, mode="strict")
    before = np.bincount(truth.ravel(), minlength=15)
    after = np.bincount(out.ravel(), minlength=15)
    for label_id in np.flatnonzero(before[1:]) + 1:
        if label_id in LARGEST_COMPONENT_IDS:
            # exactly the largest 26-connected component survives (scipy as the independent oracle); this
            # TotalSegmentator pancreas is in two halves, so it loses one -- the strict rule, on purpose
            ids, _ = ndimage.label(truth == label_id, structure=np.ones((3, 3, 3), bool))
            assert after[label_id] == np.bincount(ids.ravel())[1:].max(), label_id
            assert after[label_id] >= 0.5 * before[label_id], label_id
        else:
            assert after[label_id] >= 0.98 * before[label_id], (label_id, before[label_id], after[label_id])
    assert np.all(out[out != 0] == truth[out != 0])  # only removals, no relabelling errors


# ------------------------------------------------------------------------------------------- on the GPU (CuPy)
def _cupy_or_skip():  # type: ignore[no-untyped-def]
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # noqa: BLE001 -- CuPy without a driver raises its own runtime errors
        pytest.skip(f"no usable CUDA device ({exc.__class__.__name__})")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["paper", "strict"])
def test_cupy_map_stays_on_the_device_and_matches_numpy(mode: str, real_1mm: tuple[np.ndarray, np.ndarray]) -> None:
    cupy = _cupy_or_skip()
    for labels in (_paper_phantom(), real_1mm[1]):
        expected = postprocess(labels, ONE_MM, mode=mode)
        on_device = cupy.asarray(labels)
        assert array_module(on_device) is cupy
        out = postprocess(on_device, ONE_MM, mode=mode)
        assert isinstance(out, cupy.ndarray)
        np.testing.assert_array_equal(out.get(), expected)
        np.testing.assert_array_equal(on_device.get(), labels)  # copy=True left the input alone
        same = postprocess(on_device, ONE_MM, mode=mode, copy=False)
        assert same is on_device
        np.testing.assert_array_equal(on_device.get(), expected)


def test_speed_benchmark_refuses_a_missing_source(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from flare.benchmarks.postprocess_speed import main

    assert main(["--source", str(tmp_path / "none.nii.gz")]) == 2
    assert "none.nii.gz: source label map not found" in capsys.readouterr().err
