"""The GPU memory budget planner and the out-of-memory fallback (flare.runtime.inference.budget).

Out-of-memory errors are real: numpy's MemoryError (an impossible allocation, and one under RLIMIT_AS in a
subprocess) and ONNX Runtime's BFC arena refusing an allocation past its ``max_mem`` (in a subprocess, because the
arena allocator is registered process-wide). Nothing is mocked.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flare.runtime.inference.budget import (
    MEMORY_MODELS,
    candidate_rois,
    choose_roi,
    estimate_peak_mb,
    is_out_of_memory,
    run_with_fallback,
    tile_time_ms,
)
from flare.runtime.inference.tiling import plan_tiles

FLARE_CROP = (288, 240, 400)  # the anchors' cropped abdomen at 1 mm
#: BENCHMARKS-ANCHORS.md, ORT CUDA fp16 tile sweep: side -> (GB used, ms per tile)
SWEEP = {96: (1.83, 8.9), 128: (2.50, 19.0), 160: (3.60, 34.5), 192: (5.24, 58.0), 224: (7.54, 90.25)}


def test_memory_model_reproduces_the_anchor_sweep() -> None:
    for side, (gb, ms) in SWEEP.items():
        peak = estimate_peak_mb((side,) * 3, (side,) * 3, "onnxruntime-cuda", "fp16", resident=False, channels=0)
        assert peak == pytest.approx(gb * 1000 - 4 * side**3 / 1e6, rel=0.02)  # engine part only (no io buffers)
        assert tile_time_ms((side,) * 3, (side,) * 3) == pytest.approx(ms, rel=0.05)
    for model in MEMORY_MODELS.values():
        assert model.bytes_per_voxel > 0 and model.fixed_mb > 0 and model.source


@pytest.mark.parametrize("budget", [2500, 3000, 4000, 8000, 16000])
def test_choose_roi_fits_the_budget_and_the_rules(budget: float) -> None:
    roi = choose_roi(budget, FLARE_CROP, "onnxruntime-cuda", "fp16")
    assert all(r % 16 == 0 for r in roi)
    assert estimate_peak_mb(roi, FLARE_CROP, "onnxruntime-cuda", "fp16") <= budget
    tops = [math.ceil(s / 16) * 16 for s in FLARE_CROP]
    assert all(r <= t for r, t in zip(roi, tops))
    assert all(r * 1.5 >= max(roi) or r == t for r, t in zip(roi, tops))  # cube-ish unless the crop is thinner


def test_larger_budgets_never_give_smaller_tiles_and_whole_crop_when_it_fits() -> None:
    sizes = [math.prod(choose_roi(b, FLARE_CROP, "onnxruntime-cuda", "fp16")) for b in (3000, 4000, 8000, 40000)]
    assert sizes == sorted(sizes)
    assert choose_roi(40000, FLARE_CROP, "onnxruntime-cuda", "fp16") == (288, 240, 400)  # one tile, no seams
    assert choose_roi(4000, (100, 90, 120), "onnxruntime-cuda", "fp16") == (112, 96, 128)  # small crop: whole, padded to 16


def test_nothing_fits_gives_the_smallest_tile_and_bad_inputs_fail() -> None:
    assert choose_roi(500, FLARE_CROP, "onnxruntime-cuda", "fp16") == (32, 32, 32)
    assert choose_roi(500, (20, 200, 200), "onnxruntime-cuda", "fp32") == (32, 32, 32)
    with pytest.raises(ValueError, match="positive"):
        choose_roi(0, FLARE_CROP, "onnxruntime-cuda", "fp16")
    with pytest.raises(ValueError, match="no memory model"):
        choose_roi(4000, FLARE_CROP, "openvino", "fp16")


def test_tile_count_of_the_time_model_matches_plan_tiles() -> None:
    for roi in [(96, 96, 96), (144, 128, 144), (288, 240, 208)]:
        for overlap in (0.0, 0.5):
            n = tile_time_ms(roi, FLARE_CROP, overlap) / tile_time_ms(roi, roi, 0.0)
            assert round(n) == plan_tiles(FLARE_CROP, roi, overlap).n_tiles


def test_candidate_rois_shrink_strictly() -> None:
    rois = candidate_rois(4000, FLARE_CROP, "onnxruntime-cuda", "fp16")
    assert rois[0] == choose_roi(4000, FLARE_CROP, "onnxruntime-cuda", "fp16")
    sizes = [math.prod(r) for r in rois]
    assert len(rois) >= 2 and sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def _numpy_oom() -> MemoryError:
    try:
        np.empty(1 << 60, dtype=np.uint8)  # a real failed allocation (1 EiB)
    except MemoryError as exc:
        return exc
    raise AssertionError("allocating 1 EiB did not fail")


def test_fallback_retries_smaller_then_cpu_on_real_numpy_memory_errors() -> None:
    tried: list[tuple[int, int, int]] = []

    def attempt(roi: tuple[int, int, int]) -> str:
        tried.append(roi)
        side = 1 << 20 if roi[0] > 64 else 4  # the large rois ask for petabytes
        np.empty((side,) * 3, dtype=np.float32)
        return f"ok {roi[0]}"

    record: list[str] = []
    assert run_with_fallback(attempt, [(128,) * 3, (96,) * 3, (64,) * 3], lambda: "cpu", record=record) == "ok 64"
    assert tried == [(128,) * 3, (96,) * 3, (64,) * 3] and len(record) == 2 and "out of memory" in record[0]
    assert run_with_fallback(attempt, [(128,) * 3], lambda: "cpu") == "cpu"
    with pytest.raises(MemoryError):
        run_with_fallback(attempt, [(128,) * 3], None)


def test_other_errors_are_not_swallowed() -> None:
    calls: list[int] = []

    def attempt(roi: tuple[int, int, int]) -> None:
        calls.append(1)
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        run_with_fallback(attempt, [(64,) * 3, (32,) * 3], lambda: None)
    assert calls == [1]
    assert is_out_of_memory(_numpy_oom())
    assert not is_out_of_memory(KeyError("out of memory"))  # right words, wrong kind of error
    assert not is_out_of_memory(ValueError("x"))


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          timeout=60, env=env)


def test_fallback_under_an_address_space_limit() -> None:
    """A subprocess limits its own address space; a large allocation then fails for real, a small one passes."""
    proc = _run_python("""
        import resource
        import numpy as np
        from flare.runtime.inference.budget import run_with_fallback
        vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize')][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
        def attempt(roi):
            a = np.ones(roi[0] ** 3, dtype=np.float32)  # 640**3 * 4 B = 1 GB > limit; 256**3 * 4 B = 64 MB fits
            return roi[0], float(a[-1])
        record = []
        print(run_with_fallback(attempt, [(640,) * 3, (256,) * 3], lambda: 'cpu', record=record), len(record))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(256,", "1.0)", "1"]


def test_fallback_on_a_real_onnxruntime_arena_limit() -> None:
    """ONNX Runtime's BFC arena with a 4 MB ``max_mem`` refuses a large tile ("Available memory of … is smaller
    than requested bytes"); the fallback retries a smaller tile, and goes to the CPU path when all fail."""
    proc = _run_python("""
        import numpy as np, onnx, onnxruntime as ort
        from onnx import helper, TensorProto
        from flare.runtime.inference.budget import run_with_fallback, is_out_of_memory
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "a", "b", "c"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "a", "b", "c"])
        two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
        g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "g", [x], [y], [two])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
        mi = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(mi, ort.OrtArenaCfg(4 << 20, 1, -1, -1))  # 4 MB, kSameAsRequested
        so = ort.SessionOptions(); so.log_severity_level = 4
        so.add_session_config_entry("session.use_env_allocators", "1")
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        def attempt(roi):
            return sess.run(None, {"x": np.ones((1, 1) + roi, np.float32)})[0].shape[2:]
        record = []
        print(run_with_fallback(attempt, [(128,) * 3, (64,) * 3], lambda: "cpu", record=record), len(record))
        print(run_with_fallback(attempt, [(128,) * 3, (112,) * 3], lambda: "cpu"))
        try:
            attempt((128, 128, 128))
        except Exception as exc:
            print(type(exc).__module__.split(".")[0], is_out_of_memory(exc))
        try:
            sess.run(None, {"x": np.ones((1, 2, 3), np.float32)})  # wrong rank: a real error that is not memory
        except Exception as exc:
            print("other", is_out_of_memory(exc))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["(64, 64, 64) 1", "cpu", "onnxruntime True", "other False"]


def test_small_budgets_keep_a_reasonable_tile_and_the_arena_is_capped() -> None:
    """Tile-major order: no volume-sized accumulator on the device, so 2000 MB still gets a real tile (the old
    model collapsed to 32³ = 4680 tiles), modelled within 1.5x the default budget's time."""
    from flare.runtime.inference.budget import CONTEXT_MB, arena_limit_mb, engine_peak_mb

    key = ("onnxruntime-cuda", "fp16")
    small, default = candidate_rois(2000, FLARE_CROP, *key)[0], candidate_rois(4000, FLARE_CROP, *key)[0]
    assert min(small) >= 64
    assert tile_time_ms(small, FLARE_CROP) <= 1.5 * tile_time_ms(default, FLARE_CROP)
    for budget in (2000, 3000, 4000, 8000):
        arena = arena_limit_mb(budget, *key)
        roi = candidate_rois(budget, FLARE_CROP, *key)[0]
        assert arena < budget - CONTEXT_MB
        assert engine_peak_mb(roi, *key) - CONTEXT_MB <= arena  # the chosen tile fits the capped arena
        assert estimate_peak_mb(roi, FLARE_CROP, *key) <= budget
    assert arena_limit_mb(2000, *key) < arena_limit_mb(4000, *key)
