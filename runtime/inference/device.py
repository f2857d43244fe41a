"""Where inference runs — answered once — and everything that depends on it.

A leaf of the inference layer (it imports only the standard library, numpy and :mod:`flare.runtime.foundation`).
It holds the lazy handles of ONNX Runtime (:data:`ort`: its execution providers decide ``auto``) and CuPy:

- :func:`resolve_device` — ``auto`` / ``cpu`` / ``cuda`` → a :class:`Device` (name, array module ``xp``), cached per
  name: "is there a usable GPU?" is answered here and nowhere else;
- :func:`to_device` / :func:`to_host` / :func:`host_empty` — host↔device copies (no copy at all with ``xp=numpy``;
  page-locked host buffers with CuPy so that copies run at full PCIe speed);
- :func:`device_memory_used_mb` and :class:`DeviceMemoryPeak` — the device's used memory (NVML, else CuPy's
  ``memGetInfo``; ``None`` — reported as ``n/a`` — without a GPU).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from flare.runtime.foundation.errors import FlareError
from flare.runtime.foundation.lazy import DependencyError, lazy_import

log = logging.getLogger("flare.runtime")

__all__ = [
    "Device",
    "DeviceError",
    "DeviceMemoryPeak",
    "cupy_status",
    "device_memory_used_mb",
    "host_empty",
    "parse_device",
    "resolve_device",
    "to_device",
    "to_host",
]

Array = Any  # numpy.ndarray or cupy.ndarray


class DeviceError(FlareError):
    """The asked-for device cannot be used."""


ort = lazy_import("onnxruntime", hint="pip install 'flare-seg[cpu]' (or 'flare-seg[gpu]' for onnxruntime-gpu; "
                                      "never both)")
cupy = lazy_import("cupy", "gpu")


# -- the device ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """A resolved device: ``name`` (``cpu`` or ``cuda``), the array module of its stages (``cupy`` on CUDA when
    CuPy works, else ``numpy``: the engines then take host tiles) and why it was chosen."""

    name: str
    xp: ModuleType
    device_id: int = 0
    why: str = ""
    seconds: float = 0.0

    @property
    def on_gpu(self) -> bool:
        """True when the array stages run on the GPU (``xp`` is CuPy)."""
        return self.xp is not np


@functools.lru_cache(maxsize=1)
def cupy_status() -> tuple[bool, str]:
    """``(usable, why)``: CuPy imports, sees a CUDA device and runs a kernel on it (answered once per process)."""
    try:
        cp = cupy.load()
    except DependencyError as exc:
        return False, f"CuPy is not usable ({exc.problem[:120]})"
    try:
        n = cp.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "CuPy sees no CUDA device"
        float((cp.arange(4, dtype=cp.float32) * 2).sum())  # compiles and runs one kernel
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means: not usable
        return False, f"CuPy cannot use the CUDA device ({str(exc).splitlines()[0][:120]})"
    return True, f"CuPy {cp.__version__}, {n} CUDA device(s)"


def ort_providers() -> list[str]:
    """Execution providers of the installed ONNX Runtime (empty when it is not installed)."""
    try:
        return list(ort.get_available_providers())
    except DependencyError:
        return []


DEVICE_CHOICES = "auto, cpu, cuda, gpu, cuda:N or gpu:N"


def parse_device(device: str) -> tuple[str, int | None]:
    """``auto``/``cpu``/``cuda``/``gpu`` (TotalSegmentator's word for cuda), CUDA ones optionally with ``:N`` (the
    GPU index, as CUDA numbers the visible devices) → ``(auto|cpu|cuda, N or None)``; DeviceError otherwise."""
    text = device.strip().lower()
    name, sep, index = text.partition(":")
    name = "cuda" if name == "gpu" else name
    if name not in ("auto", "cpu", "cuda") or (sep and (name != "cuda" or not index.isdigit())):
        raise DeviceError(None, f"unknown device {device!r} (use {DEVICE_CHOICES})")
    return name, int(index) if sep else None


def resolve_device(device: str) -> Device:
    """:func:`parse_device`, then ``auto`` → ``cuda`` when ONNX Runtime has a CUDA provider, else ``cpu``; ``cuda``
    without one is a one-line :class:`DeviceError`. On CUDA the array module is CuPy when :func:`cupy_status` says
    it works, else numpy. ``cuda:N`` is CUDA device N (``Device.device_id``, passed to the engines and CuPy)."""
    name, index = parse_device(device)
    dev = _resolve(name)
    if index is None:
        return dev
    if dev.on_gpu and index >= cupy.load().cuda.runtime.getDeviceCount():
        raise DeviceError(None, f"device {device!r}: there are {cupy.load().cuda.runtime.getDeviceCount()} CUDA "
                                "device(s), numbered from 0")
    import dataclasses

    return dataclasses.replace(dev, device_id=index)


@functools.lru_cache(maxsize=4)
def _resolve(device: str) -> Device:
    t0 = time.perf_counter()
    if device == "cpu":
        return Device("cpu", np, why="asked for", seconds=0.0)
    has_cuda = "CUDAExecutionProvider" in ort_providers()
    if device == "cuda" and not has_cuda:
        raise DeviceError(None, "device cuda asked for, but ONNX Runtime has no CUDA provider "
                                "(install onnxruntime-gpu: pip install 'flare-seg[gpu]')")
    if not has_cuda:
        log.info("device auto -> cpu (no ONNX Runtime CUDA provider)")
        return Device("cpu", np, why="no ONNX Runtime CUDA provider", seconds=time.perf_counter() - t0)
    ok, why = cupy_status()
    if not ok:
        log.warning("CUDA without CuPy (%s): crop, resampling and the ensemble run on the host", why)
    xp = cupy.load() if ok else np
    return Device("cuda", xp, why=why, seconds=round(time.perf_counter() - t0, 4))


# -- host <-> device -----------------------------------------------------------------------------------------------
def to_device(arr: Array, xp: ModuleType) -> Array:
    """``arr`` as an array of ``xp``: no copy with numpy (views stay views), one host→device copy with CuPy."""
    if xp is np:
        return np.asarray(arr)
    if isinstance(arr, np.ndarray):
        return xp.asarray(np.ascontiguousarray(arr))
    return xp.asarray(arr)


def to_host(arr: Array, out: np.ndarray | None = None) -> np.ndarray:
    """A numpy array of ``arr`` (one device→host copy for CuPy arrays, into ``out`` when given; none for numpy)."""
    if isinstance(arr, np.ndarray):
        if out is None:
            return arr
        out[...] = arr
        return out
    return arr.get(out=out) if out is not None else arr.get()  # type: ignore[no-any-return]


def host_empty(shape: Sequence[int], dtype: Any, xp: ModuleType, *, zero: bool = False,
               pinned: bool = True) -> np.ndarray:
    """A host array for results of ``xp`` stages: page-locked (pinned) with CuPy and ``pinned`` — copies from the
    device then run at full PCIe speed, but page-locking costs time at allocation — plain numpy otherwise
    (``np.zeros`` pages are zeroed lazily by the OS: free until touched)."""
    shape = tuple(int(s) for s in shape)
    if not pinned or xp is not sys.modules.get("cupy"):
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    import cupyx  # comes with CuPy, which is loaded when xp is cupy

    out = cupyx.empty_pinned(shape, dtype)
    if zero:
        out.fill(0)
    return out  # type: ignore[no-any-return]


# -- device memory -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _nvml_handle(device_id: int) -> Any:
    try:
        import pynvml  # nvidia-ml-py (the bench/gpu extras)

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_id)
    except Exception:  # noqa: BLE001 - no NVML here: try CuPy, else n/a
        return None


def device_memory_used_mb(device_id: int = 0) -> float | None:
    """Used device memory, MB (total − free: CUDA context and every process included — the FLARE way), from NVML,
    else from CuPy; ``None`` without a GPU. Never initialises CUDA itself."""
    nv = _nvml_handle(device_id)
    if nv is not None:
        pynvml, handle = nv
        return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / 1e6
    cp = sys.modules.get("cupy")
    if cp is None or not cupy_status()[0]:
        return None
    with cp.cuda.Device(device_id):
        free, total = cp.cuda.runtime.memGetInfo()
    return float(total - free) / 1e6


class DeviceMemoryPeak:
    """Peak of :func:`device_memory_used_mb` over the samples taken (:meth:`sample` after each tile: ONNX Runtime's
    arena does not shrink, so per-tile samples catch its peak). ``peak_mb`` is ``None`` without a GPU."""

    def __init__(self, device_id: int = 0) -> None:
        self.device_id = device_id
        self.peak_mb: float | None = None
        self.sample()

    def sample(self) -> None:
        used = device_memory_used_mb(self.device_id)
        if used is not None:
            self.peak_mb = used if self.peak_mb is None else max(self.peak_mb, used)
