"""GPU runtime parts: the array-module stages of flare.runtime.gpu (run here with numpy, on the GPU with CuPy),
the ONNX Runtime CUDA / TensorRT engines and the native TensorRT runner.

Without a GPU (CI): the numpy path of every device stage is checked against the host pipeline
(``flare.runtime.resample``, ``flare.runtime.ensemble``) and PyTorch, and the GPU engines must fail with one-line
errors. Tests marked ``gpu`` run on a CUDA machine (``benchmarks/gpu_check.sh``) and skip cleanly elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import data_path
from flare.runtime import gpu
from flare.runtime.bundle import Bundle, load_bundle
from flare.runtime.engines import EngineError, OrtEngine, ort_providers
from flare.runtime.ensemble import infer_ensemble, sliding_window
from flare.runtime.resample import normalise_hu, resample_linear

HAS_CUDA_EP = "CUDAExecutionProvider" in ort_providers()
needs_gpu = pytest.mark.skipif(not (gpu.cupy_available() and HAS_CUDA_EP),
                               reason="needs CuPy with a CUDA device and onnxruntime-gpu")


@pytest.fixture(scope="module")
def ct_crop() -> np.ndarray:
    """A real int16 CT (upper abdomen, 3 mm), as the pipeline's crop stage would hand it over."""
    import nibabel as nib

    return np.asarray(nib.load(data_path("ts_abdomen_ct_3mm.nii.gz")).dataobj).astype(np.int16)


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


# -- without a GPU -------------------------------------------------------------------------------------------------
def test_cupy_absent_means_clean_host_fallback() -> None:
    ok, why = gpu.cupy_status()
    assert isinstance(ok, bool) and why
    if not ok:
        assert gpu.get_xp("cuda") is np
        assert gpu.device_memory_used_mb() is None
        assert gpu.DeviceMemoryPeak().peak_mb is None
    assert gpu.get_xp("cpu") is np


@pytest.mark.parametrize("out_shape", [(61, 50, 45), (130, 90, 30), (20, 120, 7)])
def test_resample_xp_matches_host_resample_and_torch(ct_crop: np.ndarray, out_shape: tuple[int, int, int]) -> None:
    import torch

    got = gpu.resample_linear_xp(ct_crop, out_shape, np)
    assert got.dtype == np.float32 and got.shape == out_shape
    np.testing.assert_allclose(got, resample_linear(ct_crop, out_shape), rtol=1e-5, atol=1e-2)  # float32, HU
    ref = torch.nn.functional.interpolate(torch.from_numpy(ct_crop.astype(np.float32))[None, None], size=out_shape,
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-2)


def test_crop_resample_xp_matches_the_pipeline_stage(ct_crop: np.ndarray) -> None:
    window = (-250.0, 250.0)
    out_shape = (91, 76, 60)
    got = gpu.crop_resample_xp(ct_crop, out_shape, window, np)
    ref = normalise_hu(resample_linear(ct_crop, out_shape), window)
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-5)  # float32 rounding of HU / 500
    assert got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_array_equal(gpu.normalise_hu_xp(ct_crop.astype(np.float32), window, np),
                                  normalise_hu(ct_crop.astype(np.float32), window))


def test_sliding_window_xp_equals_the_host_ensemble_exactly(bundle: Bundle, rng: np.random.Generator) -> None:
    engine = OrtEngine(bundle.folds[0])
    vol = rng.random((70, 50, 40), dtype=np.float32)
    for overlap, blend in ((0.0, "constant"), (0.25, "gaussian")):
        ref = np.zeros((13,) + vol.shape, np.float32)
        got = np.zeros_like(ref)
        p_ref = sliding_window(vol, engine, (32, 32, 32), ref, overlap=overlap, blend=blend)
        p_got = gpu.sliding_window_xp(vol, gpu.tile_runner(engine, np), (32, 32, 32), got, np, overlap=overlap,
                                      blend=blend)
        assert p_ref == p_got and p_got.n_tiles > 1
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_infer_ensemble_xp_matches_host_labels(bundle: Bundle, ct_crop: np.ndarray) -> None:
    engines = [OrtEngine(spec) for spec in bundle.folds]
    vol = gpu.crop_resample_xp(ct_crop, (90, 76, 30), bundle.hu_window, np)
    ref = infer_ensemble(vol, engines, (64, 64, 64), spacing_z=3.0)
    exact = gpu.infer_ensemble_xp(vol, engines, (64, 64, 64), np, spacing_z=3.0, acc_dtype=np.float32)
    np.testing.assert_array_equal(exact.labels, ref.labels)
    assert (exact.tiles, exact.roi, exact.z_range, exact.per_fold_tiles) == (ref.tiles, ref.roi, ref.z_range,
                                                                           ref.per_fold_tiles)
    half = gpu.infer_ensemble_xp(vol, engines, (64, 64, 64), np, spacing_z=3.0)  # fp16 accumulator (the GPU default)
    assert half.labels.dtype == np.uint8
    assert (half.labels == ref.labels).mean() >= 0.99


def test_accumulator_and_argmax_are_in_place_uint8() -> None:
    acc = gpu.ProbAccumulator(3, (4, 5, 6), np)
    assert acc.data.dtype == np.float16
    acc.view_z(2, 4)[1] += 1.0
    labels = acc.argmax()
    assert labels.dtype == np.uint8 and labels[:, :, 2:4].min() == 1 and labels[:, :, :2].max() == 0
    logits = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32)
    probs = gpu.softmax_xp_(logits.copy(), np)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-6)


def test_cuda_engine_without_cuda_provider_is_a_one_line_error(bundle: Bundle) -> None:
    from flare.runtime.cuda_engine import CudaOrtEngine, TrtOrtEngine

    if HAS_CUDA_EP:
        pytest.skip("onnxruntime-gpu is installed here")
    for cls, provider in ((CudaOrtEngine, "CUDAExecutionProvider"), (TrtOrtEngine, "TensorrtExecutionProvider")):
        with pytest.raises(EngineError) as err:
            cls(bundle.folds[0], "fp32")
        text = str(err.value)
        assert "\n" not in text and provider in text and str(bundle.folds[0].files["fp32"].path) in text


def test_provider_options(bundle: Bundle, tmp_path: Path) -> None:
    from flare.runtime.cuda_engine import cuda_provider_options, trt_provider_options

    half = cuda_provider_options("fp16", mem_limit_mb=1500, cuda_graph=True)
    assert half["prefer_nhwc"] == "0" and half["gpu_mem_limit"] == str(1_500_000_000)
    assert half["arena_extend_strategy"] == "kSameAsRequested" and half["enable_cuda_graph"] == "1"
    full = cuda_provider_options("fp32", extra={"cudnn_conv_algo_search": "EXHAUSTIVE"})
    assert full["prefer_nhwc"] == "1" and full["enable_cuda_graph"] == "0" and "gpu_mem_limit" not in full
    assert full["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    with pytest.raises(EngineError, match="cudnn_conv_algo_search"):
        cuda_provider_options("fp16", algo_search="FASTEST")
    trt = trt_provider_options(bundle.folds[0], "fp16", cache_root=tmp_path / "engines", max_side=64)
    spec_sha = bundle.folds[0].files["fp32"].sha256
    assert trt["trt_fp16_enable"] == "1" and trt["trt_engine_cache_path"].endswith(spec_sha[:16])
    assert Path(trt["trt_engine_cache_path"]).is_dir()
    assert trt["trt_profile_max_shapes"] == "image:1x1x64x64x64"


def test_native_tensorrt_is_guarded(bundle: Bundle) -> None:
    from flare.runtime import trt_engine

    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        with pytest.raises(EngineError, match="TensorRT is not usable"):
            trt_engine.load_engine(bundle.folds[0], "fp32")
    else:
        with pytest.raises(EngineError, match="flare-export --trt"):
            trt_engine.find_plan(bundle.folds[0], "fp32")


def test_gpu_modules_import_no_heavy_libraries() -> None:
    code = ("import sys, flare.runtime.gpu, flare.runtime.budget, flare.runtime.cuda_engine, "
            "flare.runtime.trt_engine\n"
            "bad = [m for m in ('torch', 'monai', 'cupy', 'onnxruntime', 'tensorrt') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- on a GPU ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny bundle plus fp16 files made by flare.export.fp16 (built only on a GPU machine)."""
    import json
    import shutil

    from flare.export.fp16 import convert_to_fp16
    from flare.runtime.bundle import sha256_file, write_bundle_json

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
def test_gpu_stages_match_numpy(ct_crop: np.ndarray) -> None:
    import cupy

    for out_shape in ((91, 76, 60), (244, 202, 90)):
        dev = gpu.crop_resample_xp(ct_crop, out_shape, (-250.0, 250.0), cupy)
        assert isinstance(dev, cupy.ndarray)
        np.testing.assert_allclose(gpu.to_host(dev), gpu.crop_resample_xp(ct_crop, out_shape, (-250.0, 250.0), np),
                                   rtol=0, atol=1e-5)
    logits = cupy.random.standard_normal((13, 8, 9, 10), dtype=cupy.float32)
    host = gpu.softmax_xp_(gpu.to_host(logits), np)
    np.testing.assert_allclose(gpu.to_host(gpu.softmax_xp_(logits, cupy)), host, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_engine_matches_cpu_and_stays_on_device(fp16_bundle: Bundle, precision: str) -> None:
    import cupy
    import onnxruntime as ort
    from flare.runtime.cuda_engine import CudaOrtEngine

    spec = fp16_bundle.folds[0]
    tile = np.random.default_rng(0).random((1, 1, 64, 48, 32), dtype=np.float32)
    ref = OrtEngine(spec, precision="fp32").run(tile)
    eng = CudaOrtEngine(spec, precision)
    tol = 1e-3 if precision == "fp32" else 3e-2
    host = eng.run(tile)
    np.testing.assert_allclose(host, ref, rtol=tol, atol=tol)
    dev = eng.run_cupy(cupy.asarray(tile))
    assert isinstance(dev, cupy.ndarray) and dev.dtype == cupy.float32
    np.testing.assert_allclose(dev.get(), host, rtol=1e-5, atol=1e-5)
    value = ort.OrtValue.ortvalue_from_numpy(tile, "cuda", 0)
    out = eng.run_device(value)
    assert out.device_name().lower() == "cuda"
    np.testing.assert_allclose(out.numpy(), host, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_engine_with_fixed_tiles(fp16_bundle: Bundle) -> None:
    import cupy
    from flare.runtime.cuda_engine import CudaOrtEngine

    spec = fp16_bundle.folds[0]
    eng = CudaOrtEngine(spec, "fp16", fixed_shape=(64, 64, 64))
    tiles = [np.random.default_rng(s).random((1, 1, 64, 64, 64), dtype=np.float32) for s in (1, 2)]
    first = [eng.run_cupy(cupy.asarray(t)).get() for t in tiles]
    again = [eng.run_cupy(cupy.asarray(t)).get() for t in tiles]  # graph replays
    np.testing.assert_allclose(again[0], first[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(first[0], first[1])
    with pytest.raises(EngineError, match="CUDA graph"):
        eng.run_cupy(cupy.zeros((1, 1, 32, 64, 64), cupy.float32))


@pytest.mark.gpu
@needs_gpu
def test_device_ensemble_agrees_with_cpu(fp16_bundle: Bundle, ct_crop: np.ndarray) -> None:
    import cupy
    from flare.runtime.cuda_engine import CudaOrtEngine

    vol_host = gpu.crop_resample_xp(ct_crop, (244, 202, 90), fp16_bundle.hu_window, np)
    ref = infer_ensemble(vol_host, [OrtEngine(s) for s in fp16_bundle.folds], (64, 64, 64), spacing_z=1.0)
    peak = gpu.DeviceMemoryPeak()
    vol = gpu.crop_resample_xp(ct_crop, (244, 202, 90), fp16_bundle.hu_window, cupy)
    for precision, floor in (("fp32", 0.999), ("fp16", 0.99)):
        engines = [CudaOrtEngine(s, precision) for s in fp16_bundle.folds]
        got = gpu.infer_ensemble_xp(vol, engines, (64, 64, 64), cupy, spacing_z=1.0, on_tile=peak.sample)
        assert got.labels.dtype == np.uint8 and isinstance(got.labels, np.ndarray)
        assert (got.labels == ref.labels).mean() >= floor, precision
    assert peak.peak_mb is not None and peak.peak_mb > 0


@pytest.mark.gpu
@needs_gpu
def test_real_gpu_out_of_memory_falls_back(fp16_bundle: Bundle) -> None:
    import cupy
    from flare.runtime.budget import is_out_of_memory, run_with_fallback
    from flare.runtime.cuda_engine import CudaOrtEngine

    with pytest.raises(Exception) as err:
        cupy.empty(1 << 50, dtype=cupy.uint8)
    assert is_out_of_memory(err.value)
    eng = CudaOrtEngine(fp16_bundle.folds[0], "fp32", mem_limit_mb=8)  # an 8 MB arena: 128³ tiles cannot fit

    def attempt(roi: tuple[int, int, int]) -> str:
        eng.run(np.zeros((1, 1) + roi, np.float32))
        return "gpu"

    record: list[str] = []
    assert run_with_fallback(attempt, [(128,) * 3, (96,) * 3], lambda: "cpu", record=record) == "cpu"
    assert record[-1] == "fell back to cpu" and len(record) == 3


def test_infer_with_budget_on_the_host_uses_the_bundle_roi(bundle: Bundle, ct_crop: np.ndarray) -> None:
    engines = [OrtEngine(spec) for spec in bundle.folds]
    vol = gpu.crop_resample_xp(ct_crop, (60, 50, 30), bundle.hu_window, np)
    ref = infer_ensemble(vol, engines, (64, 64, 64), spacing_z=3.0)
    got, part = gpu.infer_with_budget(vol, engines, (64, 64, 64), np, budget_mb=4000, spacing_z=3.0)
    assert (got.labels == ref.labels).mean() >= 0.99  # fp16 accumulator
    assert part["rois_tried"] == [[64, 64, 64]] and part["fallback"] == [] and part["budget_mb"] == 4000
