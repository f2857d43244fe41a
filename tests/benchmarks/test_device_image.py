"""The GPU machine gets every distribution flare needs there: preinstalled (benchmarks/device-image.txt) or
carried (benchmarks/device-wheels.txt). Read from this venv's installed metadata (flare-seg's requirements,
transitively through the carried distributions), markers evaluated for the device's CPython 3.12 on Linux."""

from __future__ import annotations

from dataclasses import replace

import pytest
from flare.benchmarks.device_image import read_image, read_wheels, uncovered


def test_runtime_needs_are_on_the_device() -> None:
    assert uncovered(extras=("gpu",)) == []


def test_gpu_check_needs_are_on_the_device() -> None:
    # bench (matplotlib, NVML) and export (torch, monai, onnx) run there too: the bundle, bench and MONAI stages
    assert uncovered(extras=("gpu", "bench", "export")) == []


def test_lists_are_well_formed() -> None:
    image, carried = read_image(), read_wheels()
    assert {"torch", "cupy-cuda13x", "numpy", "onnxruntime", "nvidia-ml-py"} <= set(image)
    assert not set(image) & set(carried), "a distribution is both preinstalled and carried"
    assert carried["onnxruntime-gpu"].how == "parts"  # 256 MB: too large for one call
    assert all(c.version for c in carried.values())


@pytest.mark.parametrize("dropped", ["jsonschema", "rpds-py", "nibabel", "connected-components-3d"])
def test_a_missing_runtime_dependency_is_caught(dropped: str) -> None:
    carried = {k: v for k, v in read_wheels().items() if k != dropped}
    problems = uncovered(extras=("gpu",), carried=carried)
    assert any(p.startswith(f"{dropped} ") for p in problems), problems


def test_a_version_the_requirement_excludes_is_caught() -> None:
    carried = read_wheels()
    carried["jsonschema"] = replace(carried["jsonschema"], version="4.0.0")  # pyproject asks >= 4.18
    assert any("jsonschema==4.0.0 does not satisfy" in p for p in uncovered(extras=("gpu",), carried=carried))
