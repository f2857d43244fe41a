"""The NVML/host memory sampler and the statistics helpers of flare-bench."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flare.benchmarks.metrics import dice_per_class, ratio, spread
from flare.benchmarks.sampler import MemorySampler, MemoryTrace, area_mb_s, gpu_info


def _has_gpu() -> bool:
    return bool(gpu_info().get("available"))


def test_sampler_without_gpu_reports_na_cleanly() -> None:
    if _has_gpu():
        pytest.skip("a GPU is visible to NVML")
    with MemorySampler(interval_s=0.01) as sampler:
        block = np.ones((32, 1024, 1024), np.uint8)  # 32 MB touched while sampling
        time.sleep(0.1)
        del block
    s = sampler.trace.summary()
    assert s["gpu"] is False and s["gpu_reason"]
    for key in ("gpu_device_peak_mb", "gpu_device_mbs", "gpu_process_peak_mb", "gpu_process_mbs"):
        assert s[key] is None
    assert s["samples"] >= 5 and s["rss_peak_mb"] > 30
    assert gpu_info()["available"] is False and gpu_info()["reason"]


def test_sampler_interval_must_be_at_most_50ms() -> None:
    with pytest.raises(ValueError):
        MemorySampler(interval_s=0.1)


def test_sampler_watches_a_given_pid_list() -> None:
    with MemorySampler(interval_s=0.01, pids=list) as sampler:
        time.sleep(0.03)
    assert sampler.trace.rss_mb and max(sampler.trace.rss_mb) == 0.0


@pytest.mark.gpu
def test_sampler_with_gpu_measures_device_memory() -> None:
    if not _has_gpu():
        pytest.skip("no GPU visible to NVML")
    with MemorySampler(interval_s=0.02) as sampler:
        time.sleep(0.1)
    s = sampler.trace.summary()
    assert s["gpu"] is True and s["gpu_device_peak_mb"] > 0 and s["gpu_device_mbs"] > 0


def test_area_under_memory_curve() -> None:
    assert area_mb_s([0.0, 1.0, 3.0], [100.0, 100.0, 200.0]) == pytest.approx(100.0 + 300.0)
    assert area_mb_s([0.0], [5.0]) == 0.0
    trace = MemoryTrace(True, "", "gpu", [0.0, 0.5, 1.0], [10.0, 30.0, 10.0], [1.0, 2.0, 1.0], [5.0, 6.0, 5.0])
    s = trace.summary()
    assert s["gpu_device_peak_mb"] == 30.0 and s["gpu_device_mbs"] == pytest.approx(20.0)
    assert s["gpu_process_peak_mb"] == 2.0 and s["rss_peak_mb"] == 6.0


def test_spread_ratio_and_dice() -> None:
    assert spread([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([None])["median"] is None
    assert ratio(1.0, 4.0) == 0.25 and ratio(None, 1.0) is None and ratio(1.0, 0.0) is None
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    a[:2] = 1
    b[:1] = 1
    b[3, 3, 3] = 14
    d = dice_per_class(a, b)
    assert set(d) == {1, 14}
    assert d[1] == pytest.approx(2 * 16 / (32 + 16)) and d[14] == 0.0
    with pytest.raises(ValueError):
        dice_per_class(a, b[:2])
