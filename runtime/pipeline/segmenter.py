"""The whole ``flare-run`` pipeline: read → locate → crop/resample → tiled ensemble → left/right split and
post-processing → restore to the input grid; returns a :class:`~flare.runtime.pipeline.result.SegmentResult` and
writes nothing (writing is the app layer's). See docs/architecture.md for each step's contract."""

from __future__ import annotations

import copy
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.bundle.manifest import Bundle, load_bundle, verify_bundle
from flare.runtime.foundation.errors import BundleError
from flare.runtime.foundation.lazy import IMPORT_SECONDS
from flare.runtime.foundation.lifecycle import pause_point
from flare.runtime.image.model import LoadedImage, to_canonical
from flare.runtime.image.nifti import read_image
from flare.runtime.inference.device import ort, resolve_device, to_device
from flare.runtime.inference.engines import CPU_ENGINES, Engine, backend_for, create_engine, default_precision
from flare.runtime.inference.ensemble import infer_with_budget, planned_tiles
from flare.runtime.inference.locate import LocateResult, locate, whole_box
from flare.runtime.inference.memory_plan import MemoryPlan
from flare.runtime.inference.sessions import FoldSessions
from flare.runtime.inference.tiling import MAX_OVERLAP
from flare.runtime.ops.finish import finish_labels
from flare.runtime.ops.geometry import Box, crop, cropped_affine, resampled_affine, spacing_from_affine, uncrop
from flare.runtime.ops.postprocessing import check_mode
from flare.runtime.ops.resample import normalise_hu, output_shape, resample_linear, resample_nearest
from flare.runtime.ops.stats import label_volumes
from flare.runtime.pipeline.result import STAGES, Report, SegmentResult

log = logging.getLogger("flare.runtime")

__all__ = ["Segmenter", "StageHooks", "check_folds", "rss_peak_mb"]

#: one thread per process that builds fold sessions in the background (see Segmenter.engines)
_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flare-sessions")


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


def check_folds(root: Path, folds: int | None, available: int) -> None:
    """``folds`` (the first N folds; None: all) must be 1 to ``available`` (one-line ``BundleError`` on ``root``)."""
    if folds is not None and not 1 <= folds <= available:
        raise BundleError(root, f"--folds {folds} asked for, the bundle has {available} fold(s)")


class Segmenter:
    """Loads a bundle and its engines once; :meth:`segment` runs the pipeline on one image (warm runs)."""

    def __init__(self, bundle: str | Path | Bundle, device: str = "auto", folds: int | None = None,
                 overlap: float | None = None, precision: str | None = None, threads: int | None = None,
                 gpu_mem_budget: float | None = None, postprocess: str | None = None,
                 cudnn_algo_search: str = "HEURISTIC", engine: str = CPU_ENGINES[0]) -> None:
        t_init = self._t_init = time.perf_counter()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify_hashes=False)
        n_folds = len(self.bundle.folds)
        self._check_folds(folds, n_folds)
        self._set_overlap(overlap)
        imports_before = sum(IMPORT_SECONDS.values())
        t_dev = time.perf_counter()
        if engine != CPU_ENGINES[0] and device == "auto":
            device = "cpu"  # the other engines run on the CPU only
        self.dev = resolve_device(device)  # answered once; cached per process
        device_init = time.perf_counter() - t_dev - (sum(IMPORT_SECONDS.values()) - imports_before)
        ort.load()  # imported here (not inside the first session's creation) so that the load timings separate
        self.device = self.dev.name
        self.xp = self.dev.xp  # cupy on CUDA when CuPy works: the tile-major ensemble on the device
        self._precision, self._threads = precision, threads
        if precision == "int8" and "int8" not in self.bundle.precisions:
            raise BundleError(self.bundle.root, "the bundle has no int8 models (export them with flare-export --int8 "
                                                "--calibration CTS)")
        self._set_postprocess(postprocess)
        specs = self.bundle.folds[: folds or n_folds]
        models = list(specs) + ([self.bundle.locator] if self.bundle.locator is not None else [])
        t_hash = time.perf_counter()  # only the files that will be loaded; cached per file version
        def chosen(spec: Any) -> str:
            return precision or default_precision(spec, self.device, engine)

        hashed = verify_bundle(self.bundle, {m.name: chosen(m) for m in models})
        hash_s = time.perf_counter() - t_hash
        # the one memory plan of this Segmenter: budget, arena cap, design, tiles, CuPy's pool
        # (flare.runtime.inference.memory_plan); the design is estimated from the files that will be loaded
        def file_mb(spec: Any) -> float:
            return spec.file_for(chosen(spec)).path.stat().st_size / 1e6

        self.plan = MemoryPlan.build(gpu_mem_budget, backend_for(self.device) if self.device == "cuda" else None,
                                     chosen(specs[0]), specs[0].out_channels,
                                     model_mb=[file_mb(s) for s in specs],
                                     locator_mb=None if self.bundle.locator is None else file_mb(self.bundle.locator))
        self._arena_mb = self.plan.arena_mb
        sessions: dict[str, float] = {}

        def make(spec: Any) -> Engine:
            t0 = time.perf_counter()
            made = create_engine(spec, self.dev, precision, threads, mem_limit_mb=self._arena_mb,
                                 algo_search=cudnn_algo_search, engine=engine)
            sessions[spec.name] = round(time.perf_counter() - t0, 4)
            return made

        self.locator: Engine | None = make(self.bundle.locator) if self.bundle.locator is not None else None
        # the folds' sessions (all of them, or the first group of the grouped design) are built on a thread while
        # the first image is read and located (ONNX Runtime releases the GIL while it builds a session);
        # :attr:`engines` waits for them
        pool = FoldSessions(specs, make, capacity=self.plan.design.group)
        self._folds_future: Future[FoldSessions] | None = _BUILDER.submit(pool.prefetch, self.plan.design.group)
        self._engines: Sequence[Engine] | None = None
        self.load_s = time.perf_counter() - t_init
        self.load: dict[str, Any] = {
            "imports_s": round(sum(IMPORT_SECONDS.values()) - imports_before, 4),
            "device_init_s": round(max(device_init, 0.0), 4),
            "hash_s": round(hash_s, 4),
            "files_hashed": hashed,
            "sessions_s": sessions,
            "first_tile_s": None,
            "cudnn_conv_algo_search": cudnn_algo_search if self.device == "cuda" else None,
            "arena_limit_mb": None if self._arena_mb is None else round(self._arena_mb, 1),
        }
        self._first_tile = True

    @property
    def engines(self) -> Sequence[Engine]:
        """The fold engines (waits for the background build on first use; its errors are raised here): a
        :class:`~flare.runtime.inference.sessions.FoldSessions` — with the grouped design sessions are made when
        their fold's turn comes."""
        if self._engines is None:
            assert self._folds_future is not None
            pool = self._folds_future.result()
            self._folds_future = None
            # the first sessions exist now: read NVML, re-decide the design from it, tiles from what is left
            design = self.plan.measure_sessions(sessions=pool.created + (self.locator is not None),
                                                folds_alive=len(pool.alive()))
            pool.capacity = design.group
            self._engines = pool
            self.load_s = max(self.load_s, time.perf_counter() - self._t_init)
        return self._engines

    @engines.setter
    def engines(self, value: Sequence[Engine]) -> None:
        self._engines = value

    def _cpu_engine(self, spec: Any) -> Engine:
        """The CPU fallback's engine for ``spec`` (fp32), made when a GPU run has run out of memory."""
        return create_engine(spec, "cpu", "fp32", self._threads)

    def _choose_rois(self, engine: Engine, cap: tuple[int, int, int], divisor: int) -> Any:
        """Tiles to try for a model under the memory plan (the bundle's ``cap`` where no memory model applies)."""
        if not self.plan.applies:
            return None
        return lambda shape: self.plan.rois(shape, max_roi=cap, channels=engine.out_channels, divisor=divisor)

    def check_grids(self, path: Path | None, shape: tuple[int, int, int], affine: np.ndarray, itemsize: int,
                    scaled: bool, source_bytes: int | None = None) -> None:
        """Refuse (one-line InputError) an image whose grids in this pipeline would exceed the limits
        (:mod:`flare.runtime.pipeline.limits`); called from the header, before the voxels are read."""
        from flare.runtime.pipeline.limits import check_grids, pipeline_grids

        check_grids(path, pipeline_grids(shape, affine, itemsize, scaled, self.bundle), affine=affine,
                    source_bytes=source_bytes)

    def _check_folds(self, folds: int | None, available: int) -> None:
        check_folds(self.bundle.root, folds, available)

    def _set_overlap(self, overlap: float | None) -> None:
        self.overlap = self.bundle.overlap if overlap is None else float(overlap)
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise BundleError(None, f"overlap must lie in [0, {MAX_OVERLAP}], got {self.overlap}")
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
    def _locate(self, data_ras: Any, spacing: tuple[float, float, float]) -> LocateResult:
        if self.locator is None:
            return LocateResult(whole_box(data_ras.shape), False, tuple(data_ras.shape), 0)  # type: ignore[arg-type]
        b = self.bundle
        assert b.locator is not None
        on_cpu = (lambda: self._cpu_engine(b.locator)) if self.device == "cuda" else None
        return locate(data_ras, spacing, self.locator, locator_spacing=b.locator_spacing_mm, roi=b.locator_roi,
                      margin_mm=b.locator_margin_mm, hu_window=b.hu_window, xp=self.xp,
                      choose_rois=self._choose_rois(self.locator, b.locator_roi, b.locator.spatial_divisor),
                      on_cpu=on_cpu, divisor=b.locator.spatial_divisor)

    def _crop_resample(self, image: Any, spacing: tuple[float, float, float], box: Box) -> Any:
        """Crop (a view), resample and normalise where ``image`` lives — on the device after the one upload of the
        image in its native dtype (one implementation for both: :mod:`flare.runtime.ops.resample` with ``xp``)."""
        region = crop(image, box)
        shape = output_shape(region.shape, spacing, self.bundle.spacing_mm)
        vol = resample_linear(region, shape, self.xp)
        return normalise_hu(vol, self.bundle.hu_window, out=vol, xp=self.xp)

    def _infer(self, vol: Any, hooks: StageHooks) -> tuple[Any, dict[str, Any] | None]:
        """The fold ensemble, tile-major on ``xp``'s device; on CUDA under the memory budget (smaller tiles on
        out-of-memory errors, then the CPU as the last resort)."""
        from flare.runtime.inference.device import to_host
        from flare.runtime.inference.ensemble import infer_ensemble

        kwargs: dict[str, Any] = {"overlap": self.overlap, "blend": self.blend, "spacing_z": self.bundle.spacing_mm[2],
                                  "divisor": self.bundle.fold_divisor}
        t0 = time.perf_counter()

        def first_tile() -> None:
            if self._first_tile:
                self._first_tile = False
                self.load["first_tile_s"] = round(time.perf_counter() - t0, 4)

        def on_cpu() -> Any:
            cpu = [self._cpu_engine(s) for s in self.bundle.folds[: len(self.engines)]]
            return infer_ensemble(to_host(vol), cpu, self.bundle.roi, **kwargs)

        on_gpu = self.device == "cuda"
        engines, design = self.engines, self.plan.design
        group = design.group if design.name == "grouped" and design.group < len(engines) else None
        if isinstance(engines, FoldSessions):
            engines.capacity = group or len(engines.specs)
        result, part = infer_with_budget(vol, engines, self.bundle.roi, self.xp,
                                         plan=self.plan if on_gpu else None,
                                         progress=hooks.tiles_done, on_tile=first_tile,
                                         on_cpu=on_cpu if on_gpu else None, group=group,
                                         **kwargs)  # type: ignore[arg-type]
        return result, part if on_gpu else None

    def _postprocess(self, merged: np.ndarray, affine_1mm: np.ndarray, boxes: Any = None) -> np.ndarray:
        """FLARE ids, left/right split and post-processing, in place on the merged map, on organ bounding boxes
        (``boxes``: the device ensemble's, else one scan)."""
        b = self.bundle
        return finish_labels(merged, affine_1mm, spacing_from_affine(affine_1mm), mode=self.postprocess_mode,
                             min_tumor_voxels=b.min_tumor_voxels, organs=b.largest_component, z_pass=b.z_pass,
                             boxes=boxes)

    @staticmethod
    def _restore(labels: np.ndarray, box: Box, ras_shape: tuple[int, ...], reorient: Any,
                 in_shape: tuple[int, ...]) -> np.ndarray:
        """The labels in the input grid (``in_shape``), in Fortran order like NIfTI's voxels: the writer then copies
        them as they lie (a C-ordered 512x512x300 map cost 0.75 s of transposition in the gzip write here). The
        small map is put in that memory order first, so that the resampling writes it in that order too."""
        crop_shape = tuple(h - l for l, h in zip(box.lo, box.hi))
        full = np.zeros(in_shape, labels.dtype, order="F")
        small = reorient.apply(np.asfortranarray(reorient.undo(labels)))  # resample_nearest keeps the memory order
        uncrop(resample_nearest(small, crop_shape), box, ras_shape, into=reorient.apply(full))
        return full

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
            image = to_device(data_ras, self.xp)  # the one upload: native dtype, in its memory order
            loc = self._locate(image, spacing)
        with stage("crop_resample"):
            vol = self._crop_resample(image, spacing, loc.box)
            del image
        with stage("infer"):
            per_fold = planned_tiles(vol.shape, self.bundle.roi, self.overlap, self.bundle.fold_divisor)
            hooks.tiles_total(per_fold * len(self.engines))
            ens, gpu_part = self._infer(vol, hooks)
            del vol
        with stage("postprocess"):
            crop_shape = tuple(h - l for l, h in zip(loc.box.lo, loc.box.hi))
            affine_1mm = resampled_affine(cropped_affine(affine_ras, loc.box), crop_shape, ens.labels.shape)
            labels = self._postprocess(ens.labels, affine_1mm, ens.boxes)
        with stage("restore"):  # and the voxel counts of the report, in the input grid (the one written)
            out = self._restore(labels, loc.box, data_ras.shape, reorient, img.data.shape)
            voxels, volume_ml = label_volumes(out, img.affine)
        report = self._report(img, loc, ens, times, time.perf_counter() - t_start)
        if gpu_part is not None:
            report.gpu = gpu_part
            report.gpu_peak_mb = gpu_part.get("gpu_peak_mb")
        report.voxels, report.volume_ml = voxels, volume_ml
        return SegmentResult(out, img, report)

    def _an_engine(self) -> Engine:
        """A fold engine for its backend/precision: one alive now (never one made just for that)."""
        engines = self.engines
        return engines.peek() if isinstance(engines, FoldSessions) else engines[0]

    def _report(self, img: LoadedImage, loc: LocateResult, ens: Any, times: dict[str, float],
                total: float) -> Report:
        engine = self._an_engine()
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
                     "engine": engine.backend,
                     "precision": engine.precision, "profile": self.bundle.profile,
                        "load_s": round(self.load_s, 4),
                     "load": dict(self.load),
                     "design": {**self.plan.design.report(), "groups": ens.groups or [list(range(ens.folds))],
                                "sessions_created": getattr(self.engines, "created", len(self.engines))}},
            folds=ens.folds,
            postprocess={"mode": self.postprocess_mode},
            stages={name: times.get(name, 0.0) for name in STAGES},
            total_s=round(total, 4),
            rss_peak_mb=round(rss_peak_mb(), 1),
            model_card=self.bundle.card.summary(),
        )

