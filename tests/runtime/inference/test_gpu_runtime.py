"""The inference core: device resolution, lazy imports, the tile-major ensemble (numpy here, CuPy on a GPU), the
ONNX Runtime CUDA / TensorRT engines, the module graph.

Without a GPU (CI) the tile-major ensemble is checked against MONAI's ``sliding_window_inference`` run fold-major
on the same ONNX models (the paper's z-crop included), and the GPU engines must fail with one-line errors. Tests
marked ``gpu`` run on a CUDA machine (``benchmarks/gpu_check.sh``) and skip cleanly elsewhere.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from conftest import data_path
from flare.runtime.bundle.manifest import Bundle, load_bundle
from flare.runtime.inference import device as dev
from flare.runtime.inference.device import DeviceError, resolve_device
from flare.runtime.inference.engines import EngineError, OrtEngine
from flare.runtime.inference.ensemble import abdominal_z_range, infer_ensemble
from flare.runtime.ops.components import label_boxes
from flare.runtime.ops.resample import normalise_hu, resample_linear
from parity_support import fold_major

HAS_CUDA_EP = "CUDAExecutionProvider" in dev.ort_providers()
needs_gpu = pytest.mark.skipif(not (dev.cupy_status()[0] and HAS_CUDA_EP),
                               reason="needs CuPy with a CUDA device and onnxruntime-gpu")


@pytest.fixture(scope="module")
def ct_crop() -> np.ndarray:
    """A real int16 CT (upper abdomen, 3 mm), as the pipeline's crop stage would hand it over."""
    import nibabel as nib

    return np.asarray(nib.load(data_path("ts_abdomen_ct_3mm.nii.gz")).dataobj).astype(np.int16)


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def parity(tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The re-biased tiny bundle of test_parity (many classes with clear margins: the z-crop really crops)."""
    from parity_support import build_parity_bundle

    return load_bundle(build_parity_bundle(tiny_checkpoints, tmp_path_factory.getbasetemp() / "parity"))


def _conv_model(path: Path, seed: int) -> OrtEngine:
    """A real ONNX model (one 3x3x3 convolution, 13 classes, zero padding: tile borders matter) that calls air
    background and tissue one of 11 organs, never tumor — so that fold 0 finds a real abdominal z-range."""
    import onnx
    from flare.runtime.bundle.manifest import ModelFile, ModelSpec
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.5, (13, 1, 3, 3, 3)).astype(np.float32)
    w[0, 0, 1, 1, 1] -= 10.0
    w[1:12, 0, 1, 1, 1] += rng.uniform(8.0, 12.0, 11).astype(np.float32)
    b = np.concatenate([[5.0], rng.normal(-5.0, 0.5, 11), [-50.0]]).astype(np.float32)
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1] * 6)
    dims = ["n", 1, "x", "y", "z"]
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 13, "x", "y", "z"])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    mf = ModelFile(path, "0" * 64, "image", "logits", "float32", "float32")
    return OrtEngine(ModelSpec(f"conv{seed}", 1, 13, 16, 17, {"fp32": mf}))


def _volume(ct: np.ndarray, shape: tuple[int, int, int], window: tuple[float, float]) -> np.ndarray:
    return normalise_hu(resample_linear(ct, shape), window)


# -- device ------------------------------------------------------------------------------------------------------
def test_device_is_resolved_once_and_bad_names_are_one_line() -> None:
    cpu = resolve_device("cpu")
    assert cpu.name == "cpu" and cpu.xp is np and not cpu.on_gpu
    assert resolve_device("auto") is resolve_device("auto")  # answered once per process
    with pytest.raises(DeviceError, match="unknown device 'tpu'") as err:
        resolve_device("tpu")
    assert "\n" not in str(err.value)
    if not HAS_CUDA_EP:
        assert resolve_device("auto").name == "cpu"
        with pytest.raises(DeviceError, match="onnxruntime-gpu"):
            resolve_device("cuda")


def test_host_device_copies_with_numpy_do_not_copy() -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    view = a[:, 1:]
    assert dev.to_device(view, np) is not None and np.shares_memory(dev.to_device(view, np), a)
    assert dev.to_host(a) is a
    out = dev.host_empty((2, 3, 4), np.float32, np, zero=True)
    assert dev.to_host(a, out=out) is out and (out == a).all()
    if not dev.cupy_status()[0]:
        assert dev.device_memory_used_mb() is None and dev.DeviceMemoryPeak().peak_mb is None


# -- the tile-major ensemble against MONAI, fold-major ------------------------------------------------------------
def _monai_fold_major(vol: np.ndarray, engines: list[OrtEngine], roi: tuple[int, int, int], overlap: float,
                      mode: str, spacing_z: float) -> tuple[np.ndarray, tuple[int, int] | None, np.ndarray]:
    """The classic order with MONAI's sliding_window_inference: fold 0 on the whole volume, its labels decide the
    abdominal z-range, folds 1..N-1 on that range; softmax summed, argmax. Returns labels, range, top-2 margin."""
    import torch
    from flare.runtime.inference.tiling import effective_roi
    from monai.inferers import sliding_window_inference

    def probs(v: np.ndarray, engine: OrtEngine) -> np.ndarray:
        with torch.no_grad():
            return sliding_window_inference(
                torch.from_numpy(np.ascontiguousarray(v))[None, None], effective_roi(v.shape, roi), 1,
                lambda x: torch.softmax(torch.from_numpy(engine.run(x.numpy())), 1), overlap=overlap, mode=mode,
                sigma_scale=0.125, padding_mode="constant")[0].numpy()

    acc = probs(vol, engines[0])
    z_range = abdominal_z_range(acc.argmax(0).astype(np.uint8), spacing_z)
    z0, z1 = z_range if z_range is not None else (0, vol.shape[2])
    for engine in engines[1:]:
        acc[:, :, :, z0:z1] += probs(vol[:, :, z0:z1], engine)
    top2 = np.sort(acc, axis=0)[-2:]
    return acc.argmax(0).astype(np.uint8), z_range, top2[1] - top2[0]


@pytest.mark.parametrize("shape", [(60, 52, 70), (47, 40, 33)])
def test_tile_major_ensemble_equals_monai_fold_major(parity: Bundle, ct_crop: np.ndarray,
                                                     shape: tuple[int, int, int]) -> None:
    """The parity bundle's SegResNets (organs everywhere: no z-crop, every fold on the whole volume)."""
    engines = [OrtEngine(spec) for spec in parity.folds]
    vol = _volume(ct_crop, shape, parity.hu_window)
    ref, ref_range, margin = _monai_fold_major(vol, engines, (32, 32, 32), 0.0, "constant", 3.0)
    got = infer_ensemble(vol, engines, (32, 32, 32), spacing_z=3.0)
    assert got.labels.dtype == np.uint8 and got.labels.shape == vol.shape
    assert got.z_range == ref_range and got.folds == 2 and got.per_fold_tiles[0] > 1
    clear = margin > 1e-4  # MONAI divides by the tile count at the end, we pre-multiply: float32 rounding only
    np.testing.assert_array_equal(got.labels[clear], ref[clear])
    assert (got.labels == ref).mean() > 0.9995
    assert len(np.unique(got.labels)) >= 3


def test_z_crop_two_passes_equal_monai_fold_major(ct_crop: np.ndarray, tmp_path: Path) -> None:
    """Air above and below the body: fold 0 finds the abdominal z-range, folds 1..N-1 run only there (on their
    own tile grid, from fold 0's parked probabilities) — the labels MONAI's fold-major ensemble gives."""
    engines = [_conv_model(tmp_path / f"conv{k}.onnx", k) for k in range(3)]
    body = _volume(ct_crop, (50, 44, 40), (-250.0, 250.0))
    vol = np.concatenate([np.zeros((50, 44, 37), np.float32), body, np.zeros((50, 44, 23), np.float32)], axis=2)
    ref, ref_range, margin = _monai_fold_major(vol, engines, (32, 32, 32), 0.0, "constant", 2.0)
    assert ref_range is not None and 30 <= ref_range[0] and ref_range[1] <= 85  # a real crop
    got = infer_ensemble(vol, engines, (32, 32, 32), spacing_z=2.0)
    assert got.z_range == ref_range and got.per_fold_tiles[1] < got.per_fold_tiles[0]
    clear = margin > 1e-4  # MONAI divides by the tile count at the end, we pre-multiply: float32 rounding only
    np.testing.assert_array_equal(got.labels[clear], ref[clear])
    assert (got.labels == ref).mean() > 0.9995
    assert len(np.unique(got.labels)) >= 3


def test_tile_major_equals_the_classic_accumulation(parity: Bundle, ct_crop: np.ndarray) -> None:
    """Fold-major accumulation of the same tiles (``sliding_window`` adds each fold into one volume) gives the
    same labels; with overlap 0.5 and Gaussian weights too (there the host keeps the partial sums)."""
    engines = [OrtEngine(spec) for spec in parity.folds]
    vol = _volume(ct_crop, (60, 52, 70), parity.hu_window)
    for overlap, blend in ((0.0, "constant"), (0.5, "gaussian")):
        acc = np.zeros((13,) + vol.shape, np.float32)
        fold_major(vol, engines[0], (32, 32, 32), acc, overlap=overlap, blend=blend)
        z_range = abdominal_z_range(acc.argmax(0).astype(np.uint8), 3.0)
        z0, z1 = z_range if z_range is not None else (0, vol.shape[2])
        fold_major(vol[:, :, z0:z1], engines[1], (32, 32, 32), acc[:, :, :, z0:z1], overlap=overlap, blend=blend)
        got = infer_ensemble(vol, engines, (32, 32, 32), overlap=overlap, blend=blend, spacing_z=3.0)
        assert got.z_range == z_range
        assert (got.labels == acc.argmax(0)).mean() > 0.9995, (overlap, blend)


class _DeviceLikeNumpy(types.ModuleType):
    """numpy under another name: the ensemble then takes its device path (copies to and from "device" arrays,
    partial sums written back to the host accumulator) — the CuPy code path, run on the CPU."""

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)


def test_device_code_path_equals_the_numpy_path(ct_crop: np.ndarray, tmp_path: Path) -> None:
    xp = _DeviceLikeNumpy("numpy_as_device")
    engines = [_conv_model(tmp_path / f"conv{k}.onnx", k) for k in range(3)]
    body = _volume(ct_crop, (50, 44, 40), (-250.0, 250.0))
    vol = np.concatenate([np.zeros((50, 44, 37), np.float32), body, np.zeros((50, 44, 23), np.float32)], axis=2)
    for overlap, blend in ((0.0, "constant"), (0.5, "gaussian")):
        ref = infer_ensemble(vol, engines, (32, 32, 32), overlap=overlap, blend=blend, spacing_z=2.0)
        exact = infer_ensemble(vol, engines, (32, 32, 32), xp, overlap=overlap, blend=blend, spacing_z=2.0,
                               park_dtype=np.float32)
        assert exact.z_range == ref.z_range is not None
        np.testing.assert_array_equal(exact.labels, ref.labels)
        # the device path parks nothing on the host: fold 0 is recomputed on pass 1's tiles inside the z-range
        assert 0 < exact.fold0_recomputed <= exact.per_fold_tiles[0] and ref.fold0_recomputed == 0
        # and the device reports a box per class (a superset of the exact one) so that the host never scans
        assert ref.boxes is None and exact.boxes is not None
        for k, box in enumerate(label_boxes(ref.labels, 12)):
            got = exact.boxes[k]
            if box is not None:  # (a class decided in pass 1 and then replaced in pass 2 may keep a box)
                assert got is not None and all(g.start <= b.start and b.stop <= g.stop for g, b in zip(got, box)), k
        single = infer_ensemble(vol, engines, (32, 32, 32), xp, overlap=overlap, blend=blend, z_crop=False)
        assert (single.labels == infer_ensemble(vol, engines, (32, 32, 32), overlap=overlap, blend=blend,
                                                z_crop=False).labels).all()


@pytest.mark.parametrize("group", [1, 2])
def test_grouped_design_equals_monai_fold_major(ct_crop: np.ndarray, tmp_path: Path, group: int) -> None:
    """The memory plan's grouped design: at most ``group`` sessions alive (made on demand, least recently used
    dropped), fold-major across groups with a host accumulator — MONAI's fold-major labels, on the host and on the
    device code path, with the z-crop and without."""
    from flare.runtime.inference.sessions import FoldSessions

    engines = [_conv_model(tmp_path / f"conv{k}.onnx", k) for k in range(3)]
    body = _volume(ct_crop, (50, 44, 40), (-250.0, 250.0))
    vol = np.concatenate([np.zeros((50, 44, 37), np.float32), body, np.zeros((50, 44, 23), np.float32)], axis=2)
    ref, ref_range, margin = _monai_fold_major(vol, engines, (32, 32, 32), 0.0, "constant", 2.0)
    clear = margin > 1e-4
    alive_at_make: list[int] = []
    for xp in (np, _DeviceLikeNumpy("numpy_as_device")):
        pools: list[FoldSessions] = []

        def make(engine: OrtEngine, pools: list[FoldSessions] = pools) -> OrtEngine:
            alive_at_make.append(len(pools[0].alive()))
            return engine

        pool = FoldSessions(engines, make, capacity=group)
        pools.append(pool)
        got = infer_ensemble(vol, pool, (32, 32, 32), xp, spacing_z=2.0, group=group)
        assert got.z_range == ref_range is not None and got.groups[0] == [0]
        assert sorted(i for g in got.groups for i in g) == [0, 1, 2] and max(len(g) for g in got.groups) <= group
        np.testing.assert_array_equal(got.labels[clear], ref[clear])
        assert got.per_fold_tiles[1] < got.per_fold_tiles[0]  # folds 1, 2 ran on the z-range only
        assert len(pool.alive()) <= group and pool.created >= 3
    assert max(alive_at_make) < group  # a session was dropped before the next one was made
    # without the z-crop: every fold over the whole volume, equal to the resident design
    whole = infer_ensemble(vol, FoldSessions(engines, lambda e: e, group), (32, 32, 32), group=group, z_crop=False)
    resident = infer_ensemble(vol, engines, (32, 32, 32), z_crop=False)
    assert (whole.labels == resident.labels).mean() > 0.9995 and whole.z_range is None


def test_single_pass_without_z_crop_and_progress(bundle: Bundle, rng: np.random.Generator) -> None:
    engines = [OrtEngine(spec) for spec in bundle.folds]
    vol = rng.random((70, 50, 40), dtype=np.float32)
    done: list[int] = []
    got = infer_ensemble(vol, engines, (32, 32, 32), z_crop=False, progress=done.append)
    acc = np.zeros((13,) + vol.shape, np.float32)
    for engine in engines:
        fold_major(vol, engine, (32, 32, 32), acc)
    assert (got.labels == acc.argmax(0)).mean() > 0.9995 and got.z_range is None
    assert sum(done) == got.tiles == 2 * got.per_fold_tiles[0]


# -- engines ---------------------------------------------------------------------------------------------------------
def test_cuda_engine_without_cuda_provider_is_a_one_line_error(bundle: Bundle) -> None:
    from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

    if HAS_CUDA_EP:
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(EngineError) as err:
        CudaOrtEngine(bundle.folds[0], "fp32")
    text = str(err.value)
    assert "\n" not in text and "CUDAExecutionProvider" in text and str(bundle.folds[0].files["fp32"].path) in text


def test_provider_options() -> None:
    from flare.runtime.inference.engines.ort_cuda import cuda_provider_options

    half = cuda_provider_options("fp16", mem_limit_mb=1500)
    assert half["prefer_nhwc"] == "0" and half["gpu_mem_limit"] == str(1_500_000_000)
    assert half["arena_extend_strategy"] == "kSameAsRequested" and "enable_cuda_graph" not in half
    assert half["cudnn_conv_algo_search"] == "HEURISTIC"  # the default: no per-shape benchmarking at cold start
    full = cuda_provider_options("fp32", algo_search="EXHAUSTIVE")
    assert full["prefer_nhwc"] == "1" and "gpu_mem_limit" not in full
    assert full["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    with pytest.raises(EngineError, match="cudnn_conv_algo_search"):
        cuda_provider_options("fp16", algo_search="FASTEST")


def test_report_has_load_sub_timings(bundle: Bundle, ct_crop: np.ndarray) -> None:
    from flare.runtime import Segmenter

    seg = Segmenter(bundle, device="cpu")
    load = seg.segment(data_path("ts_abdomen_ct_3mm.nii.gz")).report.backend["load"]
    assert set(load) >= {"imports_s", "device_init_s", "sessions_s", "first_tile_s"}
    assert set(load["sessions_s"]) == {"fold0", "fold1", "locator"} and load["first_tile_s"] > 0
    assert seg.segment(data_path("ts_abdomen_ct_3mm.nii.gz")).report.backend["load"]["first_tile_s"] == \
        load["first_tile_s"]  # the cold figure: not overwritten by warm runs


# -- on a GPU ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny bundle plus fp16 files made by flare.export.fp16 (built only on a GPU machine)."""
    import json
    import shutil

    from flare.export.fp16 import convert_to_fp16
    from flare.runtime.bundle.manifest import sha256_file, write_bundle_json

    root = tmp_path_factory.mktemp("tiny_fp16")
    for f in tiny_bundle.iterdir():
        shutil.copy(f, root / f.name)
    doc = json.loads((root / "bundle.json").read_text())
    for entry in [doc["locator"], *doc["folds"]]:
        src = entry["files"]["fp32"]
        dst = root / src["path"].replace(".fp32.", ".fp16.")
        convert_to_fp16(root / src["path"], dst)
        entry["files"]["fp16"] = {**src, "path": dst.name, "sha256": sha256_file(dst)}
    write_bundle_json(root, doc)
    return load_bundle(root)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_engine_matches_cpu_and_stays_on_device(fp16_bundle: Bundle, precision: str) -> None:
    import cupy
    from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

    spec = fp16_bundle.folds[0]
    tile = np.random.default_rng(0).random((1, 1, 64, 48, 32), dtype=np.float32)
    ref = OrtEngine(spec, precision="fp32").run(tile)
    eng = CudaOrtEngine(spec, precision)
    tol = 1e-3 if precision == "fp32" else 3e-2
    host = eng.run(tile)
    np.testing.assert_allclose(host, ref, rtol=tol, atol=tol)
    out = eng.run_cupy(cupy.asarray(tile))
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float32
    np.testing.assert_allclose(out.get(), host, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_device_ensemble_agrees_with_numpy(fp16_bundle: Bundle, ct_crop: np.ndarray) -> None:
    """The same ensemble code with xp=cupy (tile-major on the device, labels copied back per tile) against
    xp=numpy with the CPU engines."""
    import cupy
    from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

    host = _volume(ct_crop, (244, 202, 90), fp16_bundle.hu_window)
    ref = infer_ensemble(host, [OrtEngine(s) for s in fp16_bundle.folds], (64, 64, 64), spacing_z=1.0)
    peak = dev.DeviceMemoryPeak()
    vol = dev.to_device(host, cupy)
    for precision, floor in (("fp32", 0.999), ("fp16", 0.99)):
        engines = [CudaOrtEngine(s, precision) for s in fp16_bundle.folds]
        got = infer_ensemble(vol, engines, (64, 64, 64), cupy, spacing_z=1.0, on_tile=peak.sample)
        assert got.labels.dtype == np.uint8 and isinstance(got.labels, np.ndarray)
        assert got.z_range == ref.z_range or precision == "fp16"
        assert (got.labels == ref.labels).mean() >= floor, precision
    assert peak.peak_mb is not None and peak.peak_mb > 0


@pytest.mark.gpu
@needs_gpu
def test_real_gpu_out_of_memory_falls_back(fp16_bundle: Bundle) -> None:
    """A session with its own arena capped at 16 MB (``share_arena=False``: an arena registered earlier in the
    process would otherwise be used, with its own cap — why an 8 MB limit once did not fail) runs out of memory
    for real on a 160³ tile (its first activation alone is 65 MB); the fallback then tries the next tile and ends
    on the CPU."""
    import cupy
    from flare.runtime.inference.budget import is_out_of_memory, run_with_fallback
    from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

    with pytest.raises(Exception) as err:
        cupy.empty(1 << 50, dtype=cupy.uint8)
    assert is_out_of_memory(err.value)
    eng = CudaOrtEngine(fp16_bundle.folds[0], "fp32", mem_limit_mb=16, share_arena=False)

    def attempt(roi: tuple[int, int, int]) -> str:
        eng.run(np.zeros((1, 1) + roi, np.float32))
        return "gpu"

    record: list[str] = []
    assert run_with_fallback(attempt, [(160,) * 3, (128,) * 3], lambda: "cpu", record=record) == "cpu"
    assert record[-1] == "fell back to cpu" and len(record) == 3


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("budget", [2000, 4000])
def test_pipeline_on_the_gpu_within_budget(fp16_bundle: Bundle, budget: float) -> None:
    from flare.runtime import Segmenter

    seg = Segmenter(fp16_bundle, device="cuda", gpu_mem_budget=budget)
    report = seg.segment(data_path("ts_abdomen_ct_3mm.nii.gz")).report.to_json()
    assert report["backend"]["device"] == "cuda" and report["gpu"]["fallback"] == []
    assert report["backend"]["load"]["arena_limit_mb"] < budget
    assert report["gpu_peak_mb"] is not None


@pytest.mark.gpu
@needs_gpu
def test_device_upload_and_resampling_with_cupy_equal_the_host() -> None:
    """One upload in the image's memory order (a strided crop of a Fortran-order array), resampling and HU
    normalisation on the GPU: the host's values."""
    cupy = dev.cupy.load()
    rng = np.random.default_rng(1)
    image = np.asfortranarray(rng.integers(-1000, 1000, (70, 64, 50)).astype(np.int16))
    crop = image[5:60, 3:50, :]
    up = dev.to_device(crop, cupy)
    np.testing.assert_array_equal(up.get(), crop)
    got = normalise_hu(resample_linear(up, (40, 52, 61), cupy), xp=cupy)
    np.testing.assert_allclose(got.get(), normalise_hu(resample_linear(crop, (40, 52, 61))), atol=1e-6)
