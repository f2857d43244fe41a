"""Host-side (CPU) stage timings of the runtime's I/O and resampling against nibabel, scipy and MONAI.

Usage::

    python -m flare.benchmarks.host_stages [--out host_stages.json] [--repeats 3] [--no-peers] [--quiet]

A FLARE-size case is built from the real CT ``../shared/data/ts_body_ct_3mm_int32.nii.gz`` (122x101x112 at 3 mm):
resampled to 0.75x0.75x1.25 mm, padded with -1024 HU air to 512x512 in-plane (269 slices, the size of the anchor
case in ``BENCHMARKS-ANCHORS.md``), given +-10 HU Gaussian noise so that it compresses like a real scan, and written
as int16 ``.nii.gz`` (nibabel, gzip level 1) into a temporary folder. Then, in one process, each stage is timed
(best of ``--repeats`` for the fast ones, one run for scipy and MONAI): nibabel load, ``read_image`` with isal and
with the standard-library gzip, ``to_canonical``, ``resample_linear`` to 1 mm, ``scipy.ndimage.zoom(order=1)`` on the
same array, MONAI ``LoadImage + Orientation("RAS") + Spacing(1 mm)``, ``normalise_hu``, ``resample_nearest`` back to
the original grid, ``write_labels`` and nibabel's save of the same labels. Prints a Markdown table and writes JSON
with the machine (CPU model, cores), date and library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from flare.benchmarks.cases import shared_data_dir
from flare.runtime.foundation.atomic import write_text_atomic

SOURCE_CT = shared_data_dir() / "ts_body_ct_3mm_int32.nii.gz"
CASE_SPACING = (0.75, 0.75, 1.25)
CASE_INPLANE = 512
TARGET_SPACING = (1.0, 1.0, 1.0)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, date and the versions of the libraries involved."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "nibabel", "isal", "monai", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "versions": versions}


def build_case(source: Path, folder: Path) -> Path:
    """Write the FLARE-size int16 test case (see the module docstring) and return its path."""
    import nibabel as nib
    from flare.runtime.image.model import to_canonical
    from flare.runtime.image.nifti import read_image
    from flare.runtime.ops.resample import output_shape, resample_linear

    data, affine, _ = to_canonical(read_image(source))
    src_spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    shape = output_shape(data.shape, src_spacing, CASE_SPACING)
    fine = resample_linear(data, shape)
    fine += np.random.default_rng(0).normal(0.0, 10.0, fine.shape).astype(np.float32)
    full = (max(CASE_INPLANE, shape[0]), max(CASE_INPLANE, shape[1]), shape[2])
    case = np.full(full, -1024, dtype=np.int16, order="F")
    off = [(f - s) // 2 for f, s in zip(full, shape)]
    case[off[0]:off[0] + shape[0], off[1]:off[1] + shape[1], :] = np.clip(np.rint(fine), -1024, 3071)
    out_affine = np.diag([*CASE_SPACING, 1.0])
    out_affine[:3, 3] = affine[:3, 3] - np.array(off) * np.array(CASE_SPACING)
    path = folder / "flare_size_ct.nii.gz"
    img = nib.Nifti1Image(case, out_affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(out_affine, code=1)
    nib.save(img, path)
    return path


@contextlib.contextmanager
def _stage(console: Any, name: str) -> Iterator[None]:
    if console is None:
        yield
        return
    with console.status(f"timing {name} ..."):
        yield


def _time(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(max(1, repeats)):
        result = None  # let the previous result go before the next run
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _without_isal() -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def hide() -> Iterator[None]:
        saved = {k: v for k, v in sys.modules.items() if k == "isal" or k.startswith("isal.")}
        sys.modules["isal"] = None  # type: ignore[assignment]
        try:
            yield
        finally:
            del sys.modules["isal"]
            sys.modules.update(saved)

    return hide()


def run(repeats: int = 3, peers: bool = True, quiet: bool = False, source: Path = SOURCE_CT) -> dict[str, Any]:
    """Build the case, time every stage and return the result document."""
    import nibabel as nib
    from flare.runtime.image.model import to_canonical
    from flare.runtime.image.nifti import read_image, write_labels
    from flare.runtime.ops.resample import normalise_hu, output_shape, resample_linear, resample_nearest

    console = None
    if not quiet:
        from rich.console import Console

        console = Console(stderr=True)
    rows: list[dict[str, Any]] = []

    def add(stage: str, times: list[float], note: str = "") -> None:
        rows.append({"stage": stage, "best_s": min(times), "median_s": statistics.median(times), "runs": len(times),
                     "note": note})

    with tempfile.TemporaryDirectory(prefix="flare-host-") as tmp:
        folder = Path(tmp)
        with _stage(console, "building the case"):
            case = build_case(source, folder)
        with _stage(console, "nibabel load"):
            times, raw = _time(lambda: np.asanyarray(nib.load(case).dataobj), repeats)  # type: ignore[attr-defined]
            add("nibabel load (`np.asanyarray(nib.load(p).dataobj)`)", times)
        with _stage(console, "read_image"):
            times, img = _time(lambda: read_image(case), repeats)
            add("flare `read_image` (isal gzip)", times)
            assert np.array_equal(img.data, raw)
            del raw
            with _without_isal():
                times, _ = _time(lambda: read_image(case), repeats)
            add("flare `read_image` (stdlib gzip)", times)
        times, (data_ras, affine_ras, reo) = _time(lambda: to_canonical(img), repeats)
        add("flare `to_canonical`", times, "views, no copy")
        spacing = tuple(float(s) for s in np.linalg.norm(affine_ras[:3, :3], axis=0))
        fine_shape = output_shape(data_ras.shape, spacing, TARGET_SPACING)
        with _stage(console, "resample_linear"):
            times, fine = _time(lambda: resample_linear(data_ras, fine_shape), repeats)
            add(f"flare `resample_linear` {data_ras.shape} -> {fine_shape}", times)
        if peers:
            from scipy import ndimage

            zoom = [o / i for o, i in zip(fine_shape, data_ras.shape)]
            with _stage(console, "scipy.ndimage.zoom"):
                times, ref = _time(lambda: ndimage.zoom(data_ras, zoom, order=1, output=np.float32), 1)
                add("scipy `ndimage.zoom(order=1)`, same array", times)
            del ref
            add_monai(add, case, console)
        with _stage(console, "normalise_hu"):
            buf = np.empty_like(fine)
            times, vol = _time(lambda: normalise_hu(fine, out=buf), repeats)
            add("flare `normalise_hu` (1 mm volume, out=)", times)
        labels_1mm = ((vol > 0.4) * 1 + (vol > 0.6) * 4).astype(np.uint8)
        with _stage(console, "resample_nearest"):
            times, labels = _time(lambda: resample_nearest(labels_1mm, data_ras.shape), repeats)
            add(f"flare `resample_nearest` uint8 {fine_shape} -> {data_ras.shape}", times)
        labels_in = reo.undo(labels)
        with _stage(console, "write_labels"):
            out = folder / "labels.nii.gz"
            times, _ = _time(lambda: write_labels(out, labels_in, img), repeats)
            add("flare `write_labels` uint8 .nii.gz (isal level 1)", times)
            size_ours = out.stat().st_size
            times, _ = _time(lambda: nib.save(nib.Nifti1Image(labels_in, img.affine, img.header.copy()),
                                              folder / "nib_labels.nii.gz"), repeats)
            add("nibabel save uint8 labels .nii.gz", times)
            size_nib = (folder / "nib_labels.nii.gz").stat().st_size
        case_info = {"shape": list(img.data.shape), "dtype": str(img.data.dtype), "spacing_mm": list(CASE_SPACING),
                     "file_bytes": case.stat().st_size, "resampled_shape": list(fine_shape),
                     "labels_bytes_flare": size_ours, "labels_bytes_nibabel": size_nib}
    return {"benchmark": "host_stages", "machine": machine_info(), "case": case_info, "repeats": repeats,
            "resample_threads": _resample_threads(), "stages": rows}


def _resample_threads() -> int:
    from flare.runtime.ops.resample import MAX_THREADS

    return MAX_THREADS


def add_monai(add: Callable[..., None], case: Path, console: Any) -> None:
    """Time MONAI LoadImage + Orientation + Spacing(1 mm), the reference preprocessing (skipped without MONAI)."""
    try:
        import torch
        from monai.transforms import Compose, LoadImage, Orientation, Spacing
    except ImportError:
        add("MONAI LoadImage + Orientation + Spacing(1 mm)", [float("nan")], "skipped: MONAI not installed")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's notice about Orientation's `labels` default
        chain = Compose([LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS"),
                         Spacing(pixdim=TARGET_SPACING, mode="bilinear")])
    with _stage(console, "MONAI Load+Orientation+Spacing"):
        times, _ = _time(lambda: chain(str(case)), 1)
    add("MONAI LoadImage + Orientation + Spacing(1 mm)", times, f"torch threads {torch.get_num_threads()}")


def markdown(doc: dict[str, Any]) -> str:
    """The result as a Markdown table with a one-line header naming machine, case and date."""
    m, c = doc["machine"], doc["case"]
    title = (f"Host stages, {c['shape'][0]}x{c['shape'][1]}x{c['shape'][2]} {c['dtype']} CT at "
             f"{'x'.join(str(s) for s in c['spacing_mm'])} mm ({c['file_bytes'] / 2**20:.1f} MiB .nii.gz); "
             f"{m['cpu']}, {m['usable_cores']} usable cores; {m['date']}")
    lines = [title, "", "| stage | best s | median s | runs | note |", "|---|---|---|---|---|"]
    for r in doc["stages"]:
        lines.append(f"| {r['stage']} | {r['best_s']:.3f} | {r['median_s']:.3f} | {r['runs']} | {r['note']} |")
    scipy_row = [r for r in doc["stages"] if r["stage"].startswith("scipy")]
    lin = [r for r in doc["stages"] if "resample_linear" in r["stage"]]
    if scipy_row and lin:
        ratio = scipy_row[0]["best_s"] / lin[0]["best_s"]
        lines += ["", f"resample_linear is {ratio:.1f}x faster than scipy.ndimage.zoom(order=1) on the same array."]
    return "\n".join(lines)


def publish(doc: dict[str, Any], table: str, out: Path | None) -> int:
    """Print a benchmark's Markdown ``table``, write ``doc`` as JSON to ``out`` (atomically) when given; exit code 0."""
    print(table)
    if out:
        write_text_atomic(out, json.dumps(doc, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flare.benchmarks.host_stages", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast stage (best and median reported)")
    parser.add_argument("--no-peers", action="store_true", help="skip the slow scipy and MONAI comparisons")
    parser.add_argument("--source", type=Path, default=SOURCE_CT, help="the real CT the case is built from")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"{args.source}: source CT not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    doc = run(repeats=args.repeats, peers=not args.no_peers, quiet=args.quiet, source=args.source)
    return publish(doc, markdown(doc), args.out)


if __name__ == "__main__":
    sys.exit(main())
