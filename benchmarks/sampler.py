"""Memory sampling in a background thread: GPU memory through NVML (nvidia-ml-py) and host RSS from ``/proc``.

GPU memory is recorded two ways, every ``interval_s`` (≤ 50 ms by default):

- ``device``: total − free of the whole device (what FLARE measures; includes the CUDA context and anything else
  running on the GPU);
- ``process``: the memory NVML attributes to the watched process ids (this process, or a child started for a
  cold run).

Without NVML or without a GPU the sampler still runs (host RSS only) and every GPU figure is ``None``, rendered
"n/a" by the report. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

DEFAULT_INTERVAL_S = 0.02
_MB = 1024.0 * 1024.0


@dataclass
class MemoryTrace:
    """Samples of one measured run: times (s from start) and MB values; GPU lists are empty without NVML."""

    gpu_available: bool
    gpu_reason: str
    gpu_name: str | None = None
    t: list[float] = field(default_factory=list)
    device_mb: list[float] = field(default_factory=list)
    process_mb: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    baseline_device_mb: float | None = None

    def summary(self) -> dict[str, Any]:
        """Peaks (MB) and areas under the memory-time curves (MB·s); GPU entries are None without a GPU."""
        gpu = self.gpu_available and bool(self.device_mb)
        return {
            "gpu": self.gpu_available,
            "gpu_reason": self.gpu_reason,
            "gpu_name": self.gpu_name,
            "samples": len(self.t),
            "duration_s": self.t[-1] if self.t else 0.0,
            "gpu_device_peak_mb": max(self.device_mb) if gpu else None,
            "gpu_device_mbs": area_mb_s(self.t, self.device_mb) if gpu else None,
            "gpu_device_baseline_mb": self.baseline_device_mb if gpu else None,
            "gpu_process_peak_mb": max(self.process_mb) if gpu and self.process_mb else None,
            "gpu_process_mbs": area_mb_s(self.t, self.process_mb) if gpu and self.process_mb else None,
            "rss_peak_mb": max(self.rss_mb) if self.rss_mb else None,
        }


def area_mb_s(t: list[float], mb: list[float]) -> float:
    """Trapezoidal area under a memory-time curve (MB·s)."""
    if len(t) < 2:
        return 0.0
    return float(sum((t[i + 1] - t[i]) * (mb[i + 1] + mb[i]) / 2.0 for i in range(len(t) - 1)))


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (Linux ``/proc``); None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Nvml:
    """Thin wrapper over pynvml for one device; ``ok`` False (with ``reason``) when NVML is unusable."""

    def __init__(self, index: int = 0) -> None:
        self.ok, self.reason, self.name, self.handle, self._nv = False, "", None, None, None
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except pynvml.NVMLError as exc:  # no driver, no device
            self.reason = f"NVML unavailable ({exc.__class__.__name__}: {exc})"
            return
        self.ok, self._nv = True, pynvml

    def device_mb(self) -> float:
        info = self._nv.nvmlDeviceGetMemoryInfo(self.handle)  # type: ignore[union-attr]
        return (info.total - info.free) / _MB

    def process_mb(self, pids: set[int]) -> float:
        total = 0.0
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs = getattr(self._nv, getter)(self.handle)
            except self._nv.NVMLError:  # type: ignore[union-attr]  # not supported on this device/driver
                procs = []
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                if p.pid in pids and used:
                    total += used / _MB
        return total

    def close(self) -> None:
        if self.ok:
            with contextlib.suppress(self._nv.NVMLError):  # type: ignore[union-attr]
                self._nv.nvmlShutdown()  # type: ignore[union-attr]


class MemorySampler:
    """Context manager sampling GPU (NVML) and host memory of the watched processes every ``interval_s``.

    ``pids`` is a callable returning the process ids to watch (default: this process); a cold run passes a lambda
    that returns the child's pid once it is started. Use ``trace`` after the ``with`` block.
    """

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, device_index: int = 0,
                 pids: Callable[[], Iterable[int]] | None = None) -> None:
        if not 0 < interval_s <= 0.05:
            raise ValueError(f"sampling interval must lie in (0, 0.05] s, got {interval_s}")
        self.interval_s = interval_s
        self._pids = pids or (lambda: [os.getpid()])
        self._nvml = _Nvml(device_index)
        self.trace = MemoryTrace(self._nvml.ok, "" if self._nvml.ok else self._nvml.reason, self._nvml.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _sample(self) -> None:
        tr = self.trace
        pids = set(self._pids())
        tr.t.append(time.perf_counter() - self._t0)
        rss = [r for r in (rss_mb(p) for p in pids) if r is not None]
        tr.rss_mb.append(sum(rss) if rss else 0.0)
        if self._nvml.ok:
            tr.device_mb.append(self._nvml.device_mb())
            tr.process_mb.append(self._nvml.process_mb(pids))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        if self._nvml.ok:
            self.trace.baseline_device_mb = self._nvml.device_mb()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="flare-bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self._nvml.close()


def gpu_info() -> dict[str, Any]:
    """Name, total memory and driver of GPU 0 via NVML, or ``{"available": False, "reason": ...}``."""
    nv = _Nvml(0)
    if not nv.ok:
        return {"available": False, "reason": nv.reason}
    try:
        mem = nv._nv.nvmlDeviceGetMemoryInfo(nv.handle)  # type: ignore[union-attr]
        driver = nv._nv.nvmlSystemGetDriverVersion()  # type: ignore[union-attr]
        return {"available": True, "name": nv.name, "total_mb": round(mem.total / _MB),
                "driver": driver.decode() if isinstance(driver, bytes) else str(driver)}
    finally:
        nv.close()
