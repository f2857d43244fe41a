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
import os
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
    "cap_memory_pool",
    "cupy_status",
    "device_memory_used_mb",
    "host_empty",
    "is_device_array",
    "parse_device",
    "resolve_device",
    "to_device",
    "to_host",
    "to_host_into",
]

Array = Any  # numpy.ndarray or cupy.ndarray


class DeviceError(FlareError):
    """The asked-for device cannot be used."""


def _telemetry_off_where_unwritable() -> None:
    """ONNX Runtime (1.32) keeps a telemetry device id under ``$XDG_CACHE_HOME`` (else ``~/.cache``)
    ``/Microsoft/DeveloperTools`` and prints a warning on import when it cannot write there (a service account
    without a writable home, a read-only container). There, and only there, its telemetry is switched off for this
    process (``ORT_DISABLE_TELEMETRY=1``), which is what keeps that line out of every run; a value the user set wins."""
    if "ORT_DISABLE_TELEMETRY" in os.environ:
        return
    base = os.environ.get("XDG_CACHE_HOME") or (os.path.join(os.environ["HOME"], ".cache")
                                                if os.environ.get("HOME") else None)
    path = os.path.join(base, "Microsoft", "DeveloperTools") if base else None
    while path and not os.path.lexists(path):
        parent = os.path.dirname(path)
        path = None if parent == path else parent
    if not (path and os.path.isdir(path) and os.access(path, os.W_OK)):
        os.environ["ORT_DISABLE_TELEMETRY"] = "1"


ort = lazy_import("onnxruntime", hint="pip install 'flare-seg[cpu]' (or 'flare-seg[gpu]' for onnxruntime-gpu; "
                                      "never both)", before=_telemetry_off_where_unwritable)
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
        _say(f"device auto -> cpu: the installed ONNX Runtime has no CUDA provider ({', '.join(ort_providers())})")
        return Device("cpu", np, why="no ONNX Runtime CUDA provider", seconds=time.perf_counter() - t0)
    ok, why = cupy_status()
    if not ok:
        log.warning("CUDA without CuPy (%s): crop, resampling and the ensemble run on the host", why)
    if device == "auto":
        _say(f"device auto -> cuda: ONNX Runtime has the CUDA provider; {why}"
             + ("" if ok else " (arrays stay on the host)"))
    xp = cupy.load() if ok else np
    return Device("cuda", xp, why=why, seconds=round(time.perf_counter() - t0, 4))


def _say(line: str) -> None:
    """One line on stderr, always (not a log record: ``flare-run`` shows no INFO logs): why ``--device auto``
    chose what it chose."""
    print(f"flare: {line}", file=sys.stderr, flush=True)


# -- host <-> device -----------------------------------------------------------------------------------------------
#: host bytes per upload step when an array is not contiguous in its memory order (a crop of a nibabel image)
UPLOAD_CHUNK_BYTES = 16 << 20


def is_device_array(arr: Any) -> bool:
    """True for arrays of a device module (CuPy, or a stand-in with the same ``get``/``set`` interface)."""
    return callable(getattr(arr, "get", None)) and hasattr(arr, "shape")


def _memory_order(arr: np.ndarray) -> tuple[int, ...]:
    """Axes from slowest- to fastest-varying in memory (C order: 0, 1, 2; Fortran order: 2, 1, 0)."""
    return tuple(sorted(range(arr.ndim), key=lambda a: -abs(arr.strides[a])))


def to_device(arr: Array, xp: ModuleType) -> Array:
    """``arr`` as an array of ``xp``: no copy with numpy (views stay views); with a device module one host→device
    copy **in the array's own memory order** — a Fortran-order image or a crop of one is uploaded as the
    C-contiguous transpose it already is in memory and transposed back on the device as a view (no transposing
    copy on the host; a strided crop goes up in slabs of :data:`UPLOAD_CHUNK_BYTES`, each a row-wise gather)."""
    if xp is np:
        return np.asarray(arr)
    if is_device_array(arr):
        return xp.asarray(arr)
    arr = np.asarray(arr)
    if arr.ndim < 2 or arr.flags.c_contiguous:
        return xp.asarray(arr)
    order = _memory_order(arr)
    view = arr.transpose(order)  # slowest → fastest: the last axis holds the contiguous runs
    if view.flags.c_contiguous:
        dev = xp.asarray(view)
    else:
        dev = xp.empty(view.shape, view.dtype)
        step = max(1, UPLOAD_CHUNK_BYTES // max(1, view[0].nbytes))
        for a in range(0, view.shape[0], step):
            chunk = np.ascontiguousarray(view[a:a + step])
            if hasattr(dev, "set"):
                dev[a:a + step].set(chunk)
            else:  # an array module without CuPy's set(): copy through its asarray
                dev[a:a + step] = xp.asarray(chunk)
    return dev.transpose(tuple(int(i) for i in np.argsort(order)))


def to_host(arr: Array, out: np.ndarray | None = None) -> np.ndarray:
    """A numpy array of ``arr`` (one device→host copy for device arrays, into ``out`` when given; none for numpy)."""
    if not is_device_array(arr):
        if out is None:
            return np.asarray(arr)
        out[...] = arr
        return out
    return arr.get(out=out) if out is not None else arr.get()  # type: ignore[no-any-return]


def to_host_into(arr: Array, out: np.ndarray) -> None:
    """Copy ``arr`` into the host array or view ``out`` (same shape) **in out's memory order**: for a device array
    the device makes a copy transposed to that order and the host then writes contiguous runs (a C-order tile slab
    into a z-major accumulator would otherwise be an element-by-element scatter on the host)."""
    if not is_device_array(arr):
        out[...] = arr
        return
    order = _memory_order(out)
    dst = out.transpose(order)
    src = arr.transpose(order).copy()  # C-contiguous in out's order, made on the device
    if dst.flags.c_contiguous:
        src.get(out=dst)
    else:
        dst[...] = src.get()


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
def cap_memory_pool(limit_mb: float) -> None:
    """Cap CuPy's default memory pool (``set_limit``) at ``limit_mb``: CuPy raises its OutOfMemoryError (which the
    fallback handles) instead of growing past the plan. A no-op when CuPy is not in use."""
    cp = sys.modules.get("cupy")
    if cp is not None and cupy_status()[0]:
        cp.get_default_memory_pool().set_limit(size=int(limit_mb * 1e6))


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
