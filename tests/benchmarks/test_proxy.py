"""The device code path on the CPU: the stand-in array module makes the host<->device copies CuPy would make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import data_path
from flare.benchmarks.proxy import DeviceArray, StandInXp
from flare.runtime.inference.device import to_device, to_host
from flare.runtime.ops.resample import normalise_hu, resample_linear


def test_upload_in_memory_order_and_device_resampling_equal_the_host() -> None:
    xp = StandInXp()
    rng = np.random.default_rng(0)
    image = np.asfortranarray(rng.integers(-1000, 1000, (40, 36, 30)).astype(np.int16))
    crop = image[3:33, 5:30, :]  # a strided view of a Fortran-order array, as the pipeline crops
    dev = to_device(crop, xp)
    assert isinstance(dev, DeviceArray) and dev.dtype == np.int16 and dev.shape == crop.shape
    np.testing.assert_array_equal(to_host(dev), crop)
    got = normalise_hu(resample_linear(dev, (25, 20, 37), xp), xp=xp)
    assert isinstance(got, DeviceArray)
    np.testing.assert_array_equal(to_host(got), normalise_hu(resample_linear(crop, (25, 20, 37))))
    with pytest.raises(TypeError, match="host array"):
        dev[0] = np.zeros(dev.shape[1:], np.int16)  # a silent host->device copy is refused


def test_segmenter_device_path_equals_the_host_path(tiny_bundle: Path) -> None:
    """The whole pipeline through the stand-in (upload once, resampling on the device, fold 0 recomputed in pass 2
    instead of parked) gives the host path's labels."""
    from flare.runtime.pipeline.segmenter import Segmenter

    seg = Segmenter(tiny_bundle, device="cpu")
    host = seg.segment(data_path("ts_abdomen_ct_3mm.nii.gz"))
    seg.xp = StandInXp()
    dev = seg.segment(data_path("ts_abdomen_ct_3mm.nii.gz"))
    assert dev.report.crop == host.report.crop
    dev, host = dev.labels, host.labels
    assert (dev == host).mean() > 0.999
