"""The whole ``flare-run`` pipeline: read → locate → crop/resample → tiled ensemble → left/right split and
post-processing → restore to the input grid; returns a :class:`~flare.runtime.pipeline.result.SegmentResult` and
writes nothing (writing is the app layer's). See docs/architecture.md for each step's contract."""

from __future__ import annotations

import copy
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.bundle.manifest import Bundle, load_bundle
from flare.runtime.foundation.errors import BundleError
from flare.runtime.foundation.labels import merged_to_flare
from flare.runtime.foundation.lazy import IMPORT_SECONDS
from flare.runtime.foundation.lifecycle import pause_point
from flare.runtime.image.model import LoadedImage, to_canonical
from flare.runtime.image.nifti import read_image
from flare.runtime.inference.device import ort, resolve_device, to_device
from flare.runtime.inference.engines import Engine, create_engine
from flare.runtime.inference.ensemble import infer_with_budget, planned_tiles
from flare.runtime.inference.locate import LocateResult, locate, whole_box
from flare.runtime.ops.geometry import Box, crop, cropped_affine, resampled_affine, spacing_from_affine, uncrop
from flare.runtime.ops.lr_split import split_left_right
from flare.runtime.ops.postprocessing import check_mode, postprocess
from flare.runtime.ops.resample import normalise_hu, output_shape, resample_linear, resample_nearest
from flare.runtime.ops.stats import label_volumes
from flare.runtime.pipeline.result import STAGES, Report, SegmentResult

log = logging.getLogger("flare.runtime")

__all__ = ["Segmenter", "StageHooks", "rss_peak_mb"]


@dataclass
class StageHooks:
    """Progress callbacks (the CLI draws them with rich): a stage starts/ends; tiles finish."""
    stage_start: Callable[[str], None] = lambda name: None
    stage_end: Callable[[str, float], None] = lambda name, seconds: None
    tiles_total: Callable[[int], None] = lambda n: None
    tiles_done: Callable[[int], None] = lambda n: None


def rss_peak_mb() -> float:
    """This process's own peak resident set size (MB): ``VmHWM`` of ``/proc/self/status`` on Linux (reset at exec,
    unlike ``getrusage``'s ``ru_maxrss``, which Linux carries over from the parent across fork/exec), else
    ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Segmenter:
    """Loads a bundle and its engines once; :meth:`segment` runs the pipeline on one image (warm runs)."""

    def __init__(self, bundle: str | Path | Bundle, device: str = "auto", folds: int | None = None,
                 overlap: float | None = None, precision: str | None = None, threads: int | None = None,
                 gpu_mem_budget: float | None = None, postprocess: str | None = None,
                 cudnn_algo_search: str = "HEURISTIC") -> None:
        from flare.runtime.inference.budget import DEFAULT_BUDGET_MB

        t_init = time.perf_counter()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        n_folds = len(self.bundle.folds)
        self._check_folds(folds, n_folds)
        self._set_overlap(overlap)
        imports_before = sum(IMPORT_SECONDS.values())
        t_dev = time.perf_counter()
        self.dev = resolve_device(device)  # answered once; cached per process
        device_init = time.perf_counter() - t_dev - (sum(IMPORT_SECONDS.values()) - imports_before)
        ort.load()  # imported here (not inside the first session's creation) so that the load timings separate
        self.device = self.dev.name
        self.xp = self.dev.xp  # cupy on CUDA when CuPy works: the tile-major ensemble on the device
        self.gpu_mem_budget = DEFAULT_BUDGET_MB if gpu_mem_budget is None else float(gpu_mem_budget)
        self._precision, self._threads = precision, threads
        if precision == "int8" and "int8" not in self.bundle.precisions:
            raise BundleError(self.bundle.root, "the bundle has no int8 models (export them with flare-export --int8 "
                                                "--calibration CTS)")
        self._set_postprocess(postprocess)
        specs = self.bundle.folds[: folds or n_folds]
        models = list(specs) + ([self.bundle.locator] if self.bundle.locator is not None else [])
        self._arena_mb = self._arena_limit(models[0], precision) if self.device == "cuda" else None
        sessions: dict[str, float] = {}
        engines: list[Engine] = []
        for spec in models:
            t0 = time.perf_counter()
            engines.append(create_engine(spec, self.dev, precision, threads, mem_limit_mb=self._arena_mb,
                                         algo_search=cudnn_algo_search))
            sessions[spec.name] = round(time.perf_counter() - t0, 4)
        self.engines = engines[: len(specs)]
        self.locator: Engine | None = engines[len(specs)] if self.bundle.locator is not None else None
        self.load_s = time.perf_counter() - t_init
        self.load: dict[str, Any] = {
            "imports_s": round(sum(IMPORT_SECONDS.values()) - imports_before, 4),
            "device_init_s": round(max(device_init, 0.0), 4),
            "sessions_s": sessions,
            "first_tile_s": None,
            "cudnn_conv_algo_search": cudnn_algo_search if self.device == "cuda" else None,
            "arena_limit_mb": None if self._arena_mb is None else round(self._arena_mb, 1),
        }
        self._first_tile = True

    def _arena_limit(self, spec: Any, precision: str | None) -> float:
        from flare.runtime.inference.budget import MEMORY_MODELS, arena_limit_mb
        from flare.runtime.inference.engines import default_precision

        key = ("onnxruntime-cuda", precision or default_precision(spec, "cuda"))
        if key not in MEMORY_MODELS:
            return self.gpu_mem_budget
        return arena_limit_mb(self.gpu_mem_budget, *key, channels=spec.out_channels)

    def _cpu_engine(self, spec: Any) -> Engine:
        """The CPU fallback's engine for ``spec`` (fp32), made when a GPU run has run out of memory."""
        return create_engine(spec, "cpu", "fp32", self._threads)

    def _choose_rois(self, engine: Engine, cap: tuple[int, int, int]) -> Any:
        """Tiles to try for a model under the budget (the bundle's ``cap`` on the CPU)."""
        from flare.runtime.inference.budget import MEMORY_MODELS, candidate_rois

        key = (engine.backend, engine.precision)
        if self.device != "cuda" or key not in MEMORY_MODELS:
            return None
        return lambda shape: candidate_rois(self.gpu_mem_budget, shape, *key, channels=engine.out_channels,
                                            max_roi=cap, arena_mb=self._arena_mb)

    def check_grids(self, path: Path | None, shape: tuple[int, int, int], affine: np.ndarray, itemsize: int,
                    scaled: bool, source_bytes: int | None = None) -> None:
        """Refuse (one-line InputError) an image whose grids in this pipeline would exceed the limits
        (:mod:`flare.runtime.pipeline.limits`); called from the header, before the voxels are read."""
        from flare.runtime.pipeline.limits import check_grids, pipeline_grids

        check_grids(path, pipeline_grids(shape, affine, itemsize, scaled, self.bundle), affine=affine,
                    source_bytes=source_bytes)

    def _check_folds(self, folds: int | None, available: int) -> None:
        if folds is not None and not 1 <= folds <= available:
            raise BundleError(self.bundle.root, f"--folds {folds} asked for, the bundle has {available} fold(s)")

    def _set_overlap(self, overlap: float | None) -> None:
        self.overlap = self.bundle.overlap if overlap is None else float(overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise BundleError(None, f"overlap must lie in [0, 1), got {self.overlap}")
        self.blend = "gaussian" if self.overlap > 0 else self.bundle.blend

    def _set_postprocess(self, postprocess: str | None) -> None:
        try:  # "paper" (default) or "strict"; None: the bundle's postprocess.mode
            self.postprocess_mode = check_mode(self.bundle.postprocess_mode if postprocess is None else postprocess)
        except ValueError as exc:
            raise BundleError(None, f"postprocess {exc}") from None

    def with_options(self, folds: int | None = None, overlap: float | None = None,
                     postprocess: str | None = None) -> Segmenter:
        """This Segmenter with per-call options (``flare-serve`` requests): the first ``folds`` of the loaded folds,
        another tile ``overlap``, other ``postprocess`` rules. The loaded engines are shared, not reloaded; ``self``
        is unchanged."""
        other = copy.copy(self)
        self._check_folds(folds, len(self.engines))
        if folds is not None:
            other.engines = self.engines[:folds]
        if overlap is not None:
            other._set_overlap(overlap)
        if postprocess is not None:
            other._set_postprocess(postprocess)
        return other

    # -- stages -------------------------------------------------------------------------------------------------
    def _locate(self, data_ras: np.ndarray, spacing: tuple[float, float, float]) -> LocateResult:
        if self.locator is None:
            return LocateResult(whole_box(data_ras.shape), False, tuple(data_ras.shape), 0)  # type: ignore[arg-type]
        b = self.bundle
        assert b.locator is not None
        on_cpu = (lambda: self._cpu_engine(b.locator)) if self.device == "cuda" else None
        return locate(data_ras, spacing, self.locator, locator_spacing=b.locator_spacing_mm, roi=b.locator_roi,
                      margin_mm=b.locator_margin_mm, hu_window=b.hu_window, xp=self.xp,
                      choose_rois=self._choose_rois(self.locator, b.locator_roi), on_cpu=on_cpu)

    def _crop_resample(self, data_ras: np.ndarray, spacing: tuple[float, float, float], box: Box) -> Any:
        """Crop, resample and normalise on the host (one implementation: :mod:`flare.runtime.ops.resample`), then one
        copy of the float32 volume to the device when the ensemble runs there."""
        region = crop(data_ras, box)
        shape = output_shape(region.shape, spacing, self.bundle.spacing_mm)
        vol = resample_linear(region, shape)
        vol = normalise_hu(vol, self.bundle.hu_window, out=vol)
        return to_device(vol, self.xp)

    def _infer(self, vol: Any, hooks: StageHooks) -> tuple[Any, dict[str, Any] | None]:
        """The fold ensemble, tile-major on ``xp``'s device; on CUDA under the memory budget (smaller tiles on
        out-of-memory errors, then the CPU as the last resort)."""
        from flare.runtime.inference.device import to_host
        from flare.runtime.inference.ensemble import infer_ensemble

        kwargs: dict[str, Any] = {"overlap": self.overlap, "blend": self.blend, "spacing_z": self.bundle.spacing_mm[2]}
        t0 = time.perf_counter()

        def first_tile() -> None:
            if self._first_tile:
                self._first_tile = False
                self.load["first_tile_s"] = round(time.perf_counter() - t0, 4)

        def on_cpu() -> Any:
            cpu = [self._cpu_engine(s) for s in self.bundle.folds[: len(self.engines)]]
            return infer_ensemble(to_host(vol), cpu, self.bundle.roi, **kwargs)

        on_gpu = self.device == "cuda"
        result, part = infer_with_budget(vol, self.engines, self.bundle.roi, self.xp,
                                         budget_mb=self.gpu_mem_budget if on_gpu else None,
                                         progress=hooks.tiles_done, on_tile=first_tile,
                                         on_cpu=on_cpu if on_gpu else None, arena_mb=self._arena_mb,
                                         **kwargs)  # type: ignore[arg-type]
        return result, part if on_gpu else None

    def _postprocess(self, merged: np.ndarray, affine_1mm: np.ndarray) -> np.ndarray:
        b = self.bundle
        labels = split_left_right(merged_to_flare(merged), affine_1mm)
        return postprocess(labels, spacing_from_affine(affine_1mm), mode=self.postprocess_mode,
                           min_tumor_voxels=b.min_tumor_voxels, organs=b.largest_component, z_pass=b.z_pass, copy=False)

    @staticmethod
    def _restore(labels: np.ndarray, box: Box, ras_shape: tuple[int, ...], reorient: Any) -> np.ndarray:
        crop_shape = tuple(h - l for l, h in zip(box.lo, box.hi))
        full = uncrop(resample_nearest(labels, crop_shape), box, ras_shape)
        return reorient.undo(full)

    # -- the pipeline -------------------------------------------------------------------------------------------
    def segment(self, image: str | Path | LoadedImage, hooks: StageHooks | None = None) -> SegmentResult:
        """Segment ``image`` (a NIfTI path or a loaded image): the labels in its grid, the image and the report.
        Writes nothing (the app layer writes: :mod:`flare.runtime.app.write`)."""
        if self.dev.on_gpu:  # CuPy's arrays and kernels on this Segmenter's GPU (cuda:N), in this thread
            with self.xp.cuda.Device(self.dev.device_id):
                return self._segment(image, hooks)
        return self._segment(image, hooks)

    def _segment(self, image: str | Path | LoadedImage, hooks: StageHooks | None) -> SegmentResult:
        hooks = hooks or StageHooks()
        times: dict[str, float] = {}
        t_start = time.perf_counter()

        @contextmanager
        def stage(name: str) -> Iterator[None]:
            pause_point(f"stage:{name}")  # test hook (FLARE_TEST_PAUSE_AT); a no-op otherwise
            hooks.stage_start(name)
            t0 = time.perf_counter()
            yield
            times[name] = round(time.perf_counter() - t0, 4)
            hooks.stage_end(name, times[name])

        with stage("read"):
            if isinstance(image, LoadedImage):
                img = image
                self.check_grids(img.path, img.shape, img.affine, img.data.dtype.itemsize, False)
            else:
                img = read_image(image, preflight=self.check_grids)
            data_ras, affine_ras, reorient = to_canonical(img)
            spacing = spacing_from_affine(affine_ras)
        with stage("locate"):
            loc = self._locate(data_ras, spacing)
        with stage("crop_resample"):
            vol = self._crop_resample(data_ras, spacing, loc.box)
        with stage("infer"):
            per_fold = planned_tiles(vol.shape, self.bundle.roi, self.overlap)
            hooks.tiles_total(per_fold * len(self.engines))
            ens, gpu_part = self._infer(vol, hooks)
            del vol
        with stage("postprocess"):
            crop_shape = tuple(h - l for l, h in zip(loc.box.lo, loc.box.hi))
            affine_1mm = resampled_affine(cropped_affine(affine_ras, loc.box), crop_shape, ens.labels.shape)
            labels = self._postprocess(ens.labels, affine_1mm)
        with stage("restore"):
            out = self._restore(labels, loc.box, data_ras.shape, reorient)
        report = self._report(img, loc, ens, times, time.perf_counter() - t_start)
        if gpu_part is not None:
            report.gpu = gpu_part
            report.gpu_peak_mb = gpu_part.get("gpu_peak_mb")
        report.voxels, report.volume_ml = label_volumes(out, img.affine)  # in the input grid (the one written)
        return SegmentResult(out, img, report)

    def _report(self, img: LoadedImage, loc: LocateResult, ens: Any, times: dict[str, float],
                total: float) -> Report:
        return Report(
            input={"path": None if img.path is None else str(img.path), "shape": list(img.data.shape),
                   "spacing": [round(float(s), 5) for s in img.spacing],
                   "orientation": img.orientation, "oblique": img.oblique},
            crop={"lo": list(loc.box.lo), "hi": list(loc.box.hi), "located": loc.found,
                  "resampled_shape": list(ens.labels.shape)},
            tiles={"roi": list(ens.roi), "total": ens.tiles, "per_fold": ens.per_fold_tiles,
                   "overlap": self.overlap, "blend": self.blend, "locator": loc.tiles,
                   "z_range_folds_1_on": None if ens.z_range is None else list(ens.z_range)},
            backend={"device": self.device, "device_id": self.dev.device_id if self.device == "cuda" else None,
                     "engine": self.engines[0].backend,
                     "precision": self.engines[0].precision, "profile": self.bundle.profile,
                        "load_s": round(self.load_s, 4),
                     "load": dict(self.load)},
            folds=ens.folds,
            postprocess={"mode": self.postprocess_mode},
            stages={name: times.get(name, 0.0) for name in STAGES},
            total_s=round(total, 4),
            rss_peak_mb=round(rss_peak_mb(), 1),
            model_card=self.bundle.card.summary(),
        )

