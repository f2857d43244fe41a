"""A CPU-measurable proxy of the device pipeline's **host** work (``flare-bench --proxy``).

The pipeline runs its device code path (the one CuPy takes on a GPU) with two stand-ins:

- :class:`StandInXp` — an array module with CuPy's host↔device interface (``asarray`` uploads, ``.get()`` /
  ``.set()`` copy, every other function is numpy's) whose arrays (:class:`DeviceArray`) are kept apart: every
  operation on them ("device work") is timed, and their live bytes are counted, so that what remains — wall time
  minus device time (the stand-in's own bookkeeping counts as device time, the RSS probe's time as neither), RSS
  minus live device bytes — is the host's share. CuPy's per-operation launch overhead is not in it: a run reports
  ``device_ops`` (at ≈ 5–10 µs each, add ``device_ops × 10 µs`` for an upper bound);
- :class:`InstantEngine` — a benchmark-only engine with no network: logits of the right shape from two array
  operations on the tile (tissue → one organ, air → background; the locator: foreground inside a box).

Freed stand-in arrays go back to a pool, as CuPy's do (:func:`pool_like_cupy`; without it glibc's ``munmap`` of
every freed 61 MB tile output was the largest "host" cost of a run: 3–4 s of the worst case's 5 s).

So a run shows the host time per stage and the host memory between upload and labels. Device work in the
stand-in runs on the CPU, so the wall time itself says nothing about a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import json
import tempfile
import time
import types
import weakref
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DeviceArray", "InstantEngine", "StandInXp", "pool_like_cupy", "run_proxy"]

_CLOCK = {"device_s": 0.0, "depth": 0, "h2d_bytes": 0, "d2h_bytes": 0, "live": 0, "live_peak": 0, "ops": 0,
          "probe_s": 0.0, "device_cpu_s": 0.0, "probe_cpu_s": 0.0}


def _timed(fn: Any) -> Any:
    """``fn`` as one "device operation": its whole duration — the stand-in's own bookkeeping (views, live-byte
    counting) included — is device time, counted once at the outermost level (``ops`` counts them)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        if _CLOCK["depth"]:
            return fn(*args, **kwargs)
        _CLOCK["depth"] = 1
        _CLOCK["ops"] += 1
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _CLOCK["device_s"] += time.perf_counter() - t0
            _CLOCK["device_cpu_s"] += time.thread_time() - c0
            _CLOCK["depth"] = 0
    return call


def _unlive(n: int) -> None:
    _CLOCK["live"] -= n


class DeviceArray(np.ndarray):
    """An array in the stand-in's "device memory"."""

    def __array_finalize__(self, obj: Any) -> None:
        if self.base is None and self.nbytes:  # owns its memory: count it while it lives
            _CLOCK["live"] += self.nbytes
            _CLOCK["live_peak"] = max(_CLOCK["live_peak"], _CLOCK["live"])
            weakref.finalize(self, _unlive, self.nbytes)

    @_timed
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        args = [i.view(np.ndarray) if isinstance(i, DeviceArray) else i for i in inputs]
        outs = kwargs.get("out")
        if outs is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, DeviceArray) else o for o in outs)
        result = getattr(ufunc, method)(*args, **kwargs)
        if outs is not None:
            return outs[0] if len(outs) == 1 else outs
        return _as_device(result)

    @_timed
    def get(self, out: np.ndarray | None = None) -> np.ndarray:
        _CLOCK["d2h_bytes"] += self.nbytes
        host = out if out is not None else np.empty(self.shape, self.dtype)
        np.copyto(host, self.view(np.ndarray))
        return host

    @_timed
    def set(self, arr: np.ndarray) -> None:
        _CLOCK["h2d_bytes"] += arr.nbytes
        np.copyto(self.view(np.ndarray), arr)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
            raise TypeError("host array assigned into a device array: use asarray (an upload) first")
        _timed(np.ndarray.__setitem__)(self, key, value)

    @_timed
    def __getitem__(self, key: Any) -> Any:
        return _as_device(np.ndarray.__getitem__(self, key))

    @_timed
    def take(self, *args: Any, **kwargs: Any) -> Any:
        return _as_device(np.ndarray.take(self.view(np.ndarray), *args, **kwargs))

    @_timed
    def astype(self, *args: Any, **kwargs: Any) -> Any:
        return _as_device(np.ndarray.astype(self, *args, **kwargs))

    @_timed
    def argmax(self, *args: Any, **kwargs: Any) -> Any:
        return _as_device(np.ndarray.argmax(self.view(np.ndarray), *args, **kwargs))

    @_timed
    def copy(self, *args: Any, **kwargs: Any) -> Any:
        return _as_device(np.ndarray.copy(self.view(np.ndarray), *args, **kwargs))


def _as_device(x: Any) -> Any:
    if isinstance(x, np.ndarray) and not isinstance(x, DeviceArray):
        return x.view(DeviceArray) if x.base is not None else _adopt(x)
    return x


def _adopt(x: np.ndarray) -> DeviceArray:
    """A fresh result of device work as a DeviceArray (its bytes counted as device memory)."""
    dev = x.view(DeviceArray)
    _CLOCK["live"] += x.nbytes
    _CLOCK["live_peak"] = max(_CLOCK["live_peak"], _CLOCK["live"])
    weakref.finalize(dev, _unlive, x.nbytes)
    return dev


class StandInXp(types.ModuleType):
    """numpy as a "device" module (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("standin_cupy")

    @_timed
    def asarray(self, a: Any, dtype: Any = None) -> Any:
        if isinstance(a, DeviceArray):
            return a if dtype is None else a.astype(dtype)
        host = np.asarray(a, dtype=dtype)
        _CLOCK["h2d_bytes"] += host.nbytes
        dev = _adopt(np.empty(host.shape, host.dtype))
        np.copyto(dev.view(np.ndarray), host)
        return dev

    def __getattr__(self, name: str) -> Any:
        obj = getattr(np, name)
        if callable(obj) and not isinstance(obj, type):
            return _timed(lambda *a, **k: _as_device(obj(*a, **k)))
        return obj


class InstantEngine:
    """A benchmark-only engine: no network, logits from two array operations on the tile."""

    backend = "proxy"
    precision = "fp32"

    def __init__(self, xp: Any, out_channels: int = 13, keep_all: bool = True) -> None:
        self.xp, self.out_channels, self.keep_all, self.name = xp, out_channels, keep_all, "instant"

    def run_cupy(self, tile: Any) -> Any:
        xp, x = self.xp, tile[0, 0]
        out = xp.zeros((1, self.out_channels) + tuple(x.shape), xp.float32)
        if self.out_channels == 1:  # the locator: everything (the worst case), or the body
            out[0, 0] = 1.0 if self.keep_all else x - 0.3
            return out
        out[0, 0] = 0.5 - x  # background where the window is dark (air, fat)
        out[0, 1] = x - 0.5  # one organ where it is bright
        return out

    def run(self, tile: np.ndarray) -> np.ndarray:
        return np.asarray(to_host_any(self.run_cupy(self.xp.asarray(tile))))


def to_host_any(a: Any) -> np.ndarray:
    return a.get() if isinstance(a, DeviceArray) else np.asarray(a)


def _rss_mb() -> float:
    """Resident memory that is in use: RSS minus the bytes glibc's allocator holds free (kept by
    :func:`pool_like_cupy`, as CuPy's pool keeps freed device blocks), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0 - _malloc_free_bytes() / 2**20
    return float("nan")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc (>= 2.33): no pool, RSS as is
        return None


def _malloc_free_bytes() -> int:
    libc = _libc()
    return 0 if libc is None else int(libc.mallinfo2().fordblks)


def pool_like_cupy() -> bool:
    """Make freed stand-in "device" arrays cost what CuPy's memory pool makes them cost: nothing. By default glibc
    returns every array of 32 MB or more to the kernel when it is freed (``munmap``: 9 ms for a 61 MB tile of 13
    channels here) and page-faults it back in on the next allocation — host time the stand-in would charge to the
    pipeline although CuPy keeps freed device blocks in its pool. Here glibc keeps them (``mallopt``: no ``mmap``
    below 1 GiB, no trimming); :func:`_rss_mb` subtracts what it holds free. False where this is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def synthetic_ct(shape: tuple[int, int, int], body_z: tuple[int, int] | None, body_xy: float) -> Any:
    """An int16 CT in Fortran order (as nibabel gives it): air, and a tissue cylinder (radius ``body_xy`` of the
    half-width) over ``body_z`` (None: every slice — the whole-volume worst case)."""
    import nibabel as nib

    x, y = np.ogrid[: shape[0], : shape[1]]
    r = np.hypot(x - shape[0] / 2, y - shape[1] / 2) / (shape[0] / 2)
    data = np.full(shape, -1000, np.int16, order="F")
    z0, z1 = body_z or (0, shape[2])
    data[:, :, z0:z1] = np.where(r < body_xy, 60, -1000)[:, :, None].astype(np.int16)
    affine = np.diag([0.75, 0.75, 1.25, 1.0])
    return nib.Nifti1Image(data, affine)


def _bundle(folder: Path) -> Path:
    """A bundle folder with one tiny real ONNX model for every slot (the Segmenter needs real files; the proxy
    swaps its engines for :class:`InstantEngine`)."""
    import onnx
    from flare.runtime.bundle.manifest import model_entry, new_bundle_json, sha256_file, write_bundle_json
    from onnx import TensorProto, helper, numpy_helper

    def conv(name: str, c: int) -> dict[str, Any]:
        path = folder / f"{name}.onnx"
        w = numpy_helper.from_array(np.ones((c, 1, 1, 1, 1), np.float32), "w")
        node = helper.make_node("Conv", ["image", "w"], ["logits"])
        dims: list[str | int] = ["n", 1, "x", "y", "z"]
        graph = helper.make_graph([node], name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", c, "x", "y", "z"])],
                                  [w])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return {"fp32": {"path": path.name, "sha256": sha256_file(path), "input_name": "image",
                         "output_name": "logits", "input_dtype": "float32", "output_dtype": "float32"}}

    folds = [model_entry(f"fold{k}", conv(f"fold{k}", 13), 13) for k in range(5)]
    write_bundle_json(folder, new_bundle_json(folds, model_entry("locator", conv("locator", 1), 1),
                                              roi=(128, 128, 128)))
    return folder


def run_proxy(case: str = "worst", repeats: int = 2, roi: tuple[int, int, int] = (96, 96, 128),
              shape: tuple[int, int, int] = (512, 512, 300)) -> dict[str, Any]:
    """Run the Segmenter's device code path on a synthetic 512x512x300 CT (``worst``: tissue on every slice,
    locator keeps everything; ``realistic``: body over 200 of 300 slices) and return host time per stage and
    host memory (RSS minus live stand-in device bytes) sampled per tile between upload and labels."""
    from flare.runtime.image.nifti import LoadedImage
    from flare.runtime.pipeline.segmenter import Segmenter

    pooled = pool_like_cupy()
    xp = StandInXp()
    body_z = None if case == "worst" else (shape[2] // 5, shape[2] * 13 // 15)
    img = synthetic_ct(shape, body_z, 0.95 if case == "worst" else 0.7)
    loaded = LoadedImage(None, np.asarray(img.dataobj), img.affine, img.header.copy(), (0.75, 0.75, 1.25), False)
    with tempfile.TemporaryDirectory() as tmp:
        seg = Segmenter(_bundle(Path(tmp)), device="cpu")
        seg.xp = xp
        seg.engines = [InstantEngine(xp) for _ in range(5)]
        seg.locator = InstantEngine(xp, 1, keep_all=case == "worst")
        seg.bundle = _with_roi(seg.bundle, roi)
        runs = []
        for _ in range(repeats):
            runs.append(_one_run(seg, loaded))
    return {"case": case, "shape": list(shape), "roi": list(roi), "device_memory_pool": pooled, "runs": runs}


def _with_roi(bundle: Any, roi: tuple[int, int, int]) -> Any:
    import dataclasses

    return dataclasses.replace(bundle, roi=roi)


def _one_run(seg: Any, image: Any) -> dict[str, Any]:
    from flare.runtime.pipeline.segmenter import StageHooks

    stages: dict[str, dict[str, float]] = {}
    marks: dict[str, tuple[float, float]] = {}
    cpu_marks: dict[str, tuple[float, float]] = {}
    host_mem = {"peak_mb": 0.0, "baseline_mb": 0.0}

    current = {"stage": "read"}
    per_stage: dict[str, float] = {}

    def sample(_n: int = 0) -> None:  # the probe's own time is neither host nor device work of the pipeline
        t0, c0 = time.perf_counter(), time.thread_time()
        host = _rss_mb() - _CLOCK["live"] / 2**20
        host_mem["peak_mb"] = max(host_mem["peak_mb"], host)
        per_stage[current["stage"]] = max(per_stage.get(current["stage"], 0.0), host - host_mem["baseline_mb"])
        _CLOCK["probe_s"] += time.perf_counter() - t0
        _CLOCK["probe_cpu_s"] += time.thread_time() - c0

    def start(name: str) -> None:
        marks[name] = (time.perf_counter(), _CLOCK["device_s"] + _CLOCK["probe_s"])
        cpu_marks[name] = (time.thread_time(), _CLOCK["device_cpu_s"] + _CLOCK["probe_cpu_s"])
        current["stage"] = name
        if name == "locate":
            host_mem["baseline_mb"] = _rss_mb()
            host_mem["peak_mb"] = 0.0
        sample()

    def end(name: str, _seconds: float) -> None:
        t0, d0 = marks[name]
        sample()
        wall, dev = time.perf_counter() - t0, _CLOCK["device_s"] + _CLOCK["probe_s"] - d0
        c0, dc0 = cpu_marks[name]
        host_cpu = time.thread_time() - c0 - (_CLOCK["device_cpu_s"] + _CLOCK["probe_cpu_s"] - dc0)
        stages[name] = {"wall_s": round(wall, 3), "device_s": round(dev, 3), "host_s": round(wall - dev, 3),
                        "host_cpu_s": round(host_cpu, 3),
                        "host_mb_above_start": round(per_stage.get(name, 0.0), 1)}

    _CLOCK.update(h2d_bytes=0, d2h_bytes=0, ops=0)
    report = seg.segment(image, hooks=StageHooks(stage_start=start, stage_end=end, tiles_done=sample)).report
    inner = [s for s in stages if s not in ("read", "write")]
    return {
        "stages": stages,
        "host_s_outside_read_write": round(sum(stages[s]["host_s"] for s in inner), 3),
        # the same in CPU seconds of the pipeline's thread: what a shared box's load does not inflate
        "host_cpu_s_outside_read_write": round(sum(stages[s]["host_cpu_s"] for s in inner), 3),
        "host_rss_above_start_mb": round(host_mem["peak_mb"] - host_mem["baseline_mb"], 1),
        "h2d_mb": round(_CLOCK["h2d_bytes"] / 2**20, 1), "d2h_mb": round(_CLOCK["d2h_bytes"] / 2**20, 1),
        "device_live_peak_mb": round(_CLOCK["live_peak"] / 2**20, 1),
        "device_ops": _CLOCK["ops"],  # CuPy would add its launch overhead (≈ 5-10 µs each) to the host time
        "crop": report.crop, "tiles": report.tiles,
    }


def main(case: str, repeats: int, output: Path | None) -> dict[str, Any]:
    if case not in ("worst", "realistic"):
        from flare.runtime.foundation.errors import InputError

        raise InputError(None, f"--proxy {case!r}: use worst or realistic")
    doc = {"machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           **run_proxy(case, repeats)}
    text = json.dumps(doc, indent=1)
    if output is not None:
        from flare.runtime.foundation.atomic import write_text_atomic

        output.parent.mkdir(exist_ok=True)
        write_text_atomic(output, text + "\n")
    print(text)
    return doc


def _machine() -> str:
    import os
    import platform

    load = os.getloadavg()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load[0]:.1f}"


if __name__ == "__main__":  # pragma: no cover
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else "worst", 2, None)
