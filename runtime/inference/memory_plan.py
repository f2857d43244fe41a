"""The memory plan: one object per Segmenter that owns the device memory budget and every decision made from it.

Built once (:meth:`MemoryPlan.build`) and passed to the locator, the ensemble and engine creation:

- the **budget** (:data:`DEFAULT_BUDGET_MB`, defined here once; ``flare-run --gpu-mem-budget`` and ``flare-serve``
  read it from here) means the process's whole device footprint as NVML counts it (used device memory: CUDA
  context, every session's weights and cuDNN/cuBLAS state, ONNX Runtime's arena, CuPy's pool);
- whether a **memory model applies** is decided in :attr:`MemoryPlan.applies` and nowhere else: a CUDA device
  and a model row for the engines' ``(backend, precision)`` (:data:`flare.runtime.inference.budget.MEMORY_MODELS`);
- ONNX Runtime's **arena cap** (``gpu_mem_limit``, :attr:`arena_mb`) for the sessions. The arena is registered
  once per process (:func:`flare.runtime.inference.engines.ort_cuda.shared_cuda_arena`): a second Segmenter with
  another budget in the same process keeps the first cap and gets a warning — use one budget per process;
- after the sessions exist, :meth:`measure_sessions` reads the device's used memory; **tiles are chosen from
  what is left** (:meth:`rois`) — the model's fixed part (context, weights, workspace) is replaced by that
  measurement — and **CuPy's pool is capped** at what is left minus the engine's share of the largest tile;
- out-of-memory: :func:`flare.runtime.inference.budget.run_with_fallback` (smaller tiles, arena shrinkage, then
  the CPU), each fallback recorded in the report (``gpu.fallback``);
- the **design** (:class:`Design`, :meth:`MemoryPlan.design`) — decided here and nowhere else: ``resident`` (every
  fold session alive for the life of the Segmenter, tile-major over all folds: the fastest) when the sessions and
  the smallest useful tile fit the budget, else ``grouped`` (at most ``group`` fold sessions alive at a time, the
  others created when their turn comes; fold-major across groups with the summed probabilities in a host
  accumulator, as the paper's ensemble did). Before any session exists the decision is an **estimate** from the
  bundle's model file sizes and the documented constants (:data:`SESSION_STATE_MB`, the memory model's fixed part);
  once the first sessions exist on a GPU, :meth:`measure_sessions` replaces it by what NVML says they use.

Arithmetic (estimate, not measured): the ONNX Runtime CUDA fp16 model's fixed part (1342 MB: CUDA context,
workspace, one 174 MB fp16 session) + per further fold session its weights (file size, ≈ 176 MB for a flare23 fold)
+ :data:`SESSION_STATE_MB` (cuDNN/cuBLAS state outside the arena, 200 MB) + the locator (2 MB + 200 MB) + the fp32
worst-case volume (221 MB) + the smallest useful tile (64³: ≈ 200 MB). Five resident folds: ≈ 3.5 GB — fits the
default 4000 MB, not 2000 MB; one fold at a time: ≈ 1.97 GB — the design at ``--gpu-mem-budget 2000``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flare.runtime.inference.budget import (
    MEMORY_MODELS,
    WORST_CROP,
    arena_limit_mb,
    candidate_rois,
    memory_model,
    xp_peak_mb,
)
from flare.runtime.inference.device import cap_memory_pool, device_memory_used_mb

log = logging.getLogger("flare.runtime")

__all__ = ["DEFAULT_BUDGET_MB", "MIN_WORKING_ROI", "SESSION_STATE_MB", "Design", "MemoryPlan"]

#: the default device memory budget, MB (the FLARE limit: 4 GB); the one definition
DEFAULT_BUDGET_MB = 4000.0

Roi = tuple[int, int, int]

#: per ONNX Runtime CUDA session, outside the shared arena: cuDNN/cuBLAS handles and cuBLAS workspace, MB
#: (**estimate**: the anchors' 0.1–0.3 GB per session; NVML replaces it once sessions exist)
SESSION_STATE_MB = 200.0
#: the fp16 weights of the model the memory model's fixed part was fitted with (one 174 MB flare23 fold), MB
FIT_WEIGHTS_MB = 174.0
#: the smallest tile a design must leave room for: a design where not even this fits is not chosen
MIN_WORKING_ROI: Roi = (64, 64, 64)


@dataclass(frozen=True)
class Design:
    """How the fold sessions live on the device: ``resident`` (all ``folds`` sessions for the life of the
    Segmenter, tile-major over every fold) or ``grouped`` (at most ``group`` at a time, fold-major across groups
    with a host accumulator). ``source``: ``estimate`` (file sizes + constants) or ``measured`` (NVML)."""

    name: str
    group: int
    folds: int
    source: str
    why: str
    sessions_mb: float | None = None  # the estimated or measured device memory of the chosen sessions + context

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "folds": self.folds, "source": self.source, "why": self.why,
                "sessions_mb": None if self.sessions_mb is None else round(self.sessions_mb, 1)}


def _resident(folds: int, why: str) -> Design:
    return Design("resident", folds, folds, "none", why)


@dataclass
class MemoryPlan:
    budget_mb: float
    key: tuple[str, str] | None  # (backend, precision) of the fold engines; None: no device engine
    channels: int = 13
    arena_mb: float | None = None
    after_sessions_mb: float | None = None
    pool_limit_mb: float | None = None
    model_mb: tuple[float, ...] = ()   # the fold models' file sizes (the precision loaded), MB
    locator_mb: float | None = None    # the locator's file size (None: no locator), MB
    before_sessions_mb: float | None = None
    design: Design = field(default_factory=lambda: _resident(1, ""))

    @classmethod
    def build(cls, budget_mb: float | None, backend: str | None, precision: str, channels: int, *,
              model_mb: Sequence[float] = (), locator_mb: float | None = None) -> MemoryPlan:
        """The plan for fold engines of ``backend`` (None on the CPU) at ``precision`` under ``budget_mb``, for fold
        models of ``model_mb`` MB each (file sizes) and a locator of ``locator_mb`` MB."""
        budget = DEFAULT_BUDGET_MB if budget_mb is None else float(budget_mb)
        if budget <= 0:
            raise ValueError(f"memory budget must be positive, got {budget} MB")
        folds = max(1, len(model_mb))
        plan = cls(budget, None if backend is None else (backend, precision), channels,
                   model_mb=tuple(float(m) for m in model_mb), locator_mb=locator_mb,
                   design=_resident(folds, "no device memory model applies (CPU): every fold resident"))
        if plan.applies:
            assert plan.key is not None
            plan.arena_mb = arena_limit_mb(budget, *plan.key, channels=channels)
            plan.before_sessions_mb = device_memory_used_mb()
            plan.design = plan._choose(plan._estimated_sessions_mb, "estimate")
        return plan

    # -- the design ------------------------------------------------------------------------------------------
    def working_mb(self) -> float:
        """Device memory beyond the sessions that the smallest useful tile needs (:data:`MIN_WORKING_ROI`: the
        engine's activations and our buffers) plus the worst-case fp32 volume, MB (modelled)."""
        assert self.key is not None
        tile = math.prod(MIN_WORKING_ROI)
        return (memory_model(*self.key).bytes_per_voxel * tile / 1e6
                + xp_peak_mb(MIN_WORKING_ROI, WORST_CROP, self.channels))

    def _estimated_sessions_mb(self, k: int) -> float:
        """Context, workspace and ``k`` fold sessions (the largest ``k`` files) plus the locator, MB (estimate)."""
        assert self.key is not None
        weights = sorted(self.model_mb, reverse=True)[:k] or [FIT_WEIGHTS_MB]
        locator = 0.0 if self.locator_mb is None else self.locator_mb + SESSION_STATE_MB
        return (memory_model(*self.key).fixed_mb + sum(weights) - FIT_WEIGHTS_MB
                + (len(weights) - 1) * SESSION_STATE_MB + locator)

    def _choose(self, sessions_mb: Any, source: str) -> Design:
        """The largest number of fold sessions ``k`` whose ``sessions_mb(k)`` + :meth:`working_mb` fits the budget:
        all of them → ``resident``, fewer → ``grouped`` (at least one: below that the out-of-memory fallback
        decides)."""
        folds = max(1, len(self.model_mb))
        need = self.working_mb()
        fits = [k for k in range(folds, 0, -1) if sessions_mb(k) + need <= self.budget_mb]
        k = fits[0] if fits else 1
        peak = sessions_mb(k) + need
        what = (f"{source}: {k} of {folds} fold session(s) + context {sessions_mb(k):.0f} MB, + the smallest "
                f"tile {'x'.join(map(str, MIN_WORKING_ROI))} and the worst-case volume {need:.0f} MB = {peak:.0f} MB "
                f"{'<=' if fits else '>'} budget {self.budget_mb:.0f} MB")
        if k == folds:
            return Design("resident", folds, folds, source, what, sessions_mb(k))
        if not fits:
            what += " (not even one fold fits: one at a time, the out-of-memory fallback decides)"
        return Design("grouped", k, folds, source, what, sessions_mb(k))

    def measured_design(self, sessions: int, folds_alive: int) -> Design:
        """After ``sessions`` sessions (``folds_alive`` of them folds, the rest the locator) exist: the design from
        NVML — the measured memory of a fold session replaces the estimate. The current design when NVML is not
        available."""
        if self.after_sessions_mb is None or sessions < 1 or folds_alive < 1:
            return self.design
        base = self.before_sessions_mb or 0.0
        per_session = max(self.after_sessions_mb - base, 0.0) / sessions
        others = self.after_sessions_mb - per_session * folds_alive  # context, the locator, other processes

        def measured(k: int) -> float:
            return others + per_session * k

        return self._choose(measured, "measured")

    @property
    def applies(self) -> bool:
        """Whether a memory model applies: the one place this is decided."""
        return self.key is not None and self.key in MEMORY_MODELS

    def measure_sessions(self, sessions: int = 1, folds_alive: int = 1) -> Design:
        """After the sessions exist (``sessions`` of them, ``folds_alive`` fold sessions): the device's used memory
        (NVML), the design re-decided from it (:meth:`measured_design`: the caller then drops fold sessions beyond
        ``design.group``), and CuPy's pool capped at what is left of the budget minus the engine's share of the
        tile the worst-case crop would get. Returns the design."""
        if not self.applies:
            return self.design
        self.after_sessions_mb = device_memory_used_mb()
        if self.after_sessions_mb is None:
            return self.design
        design = self.measured_design(sessions, folds_alive)
        if design.group < folds_alive and design.sessions_mb is not None:  # the sessions beyond the group will be
            self.after_sessions_mb = design.sessions_mb                    # dropped: their memory is not "used"
        self.design = design
        left = self.budget_mb - self.after_sessions_mb
        if left <= 0:
            log.warning("the sessions alone use %.0f MB of the %.0f MB budget: tiles will be the smallest, and "
                        "out-of-memory fallbacks likely", self.after_sessions_mb, self.budget_mb)
        roi = self.rois(WORST_CROP)[0]
        assert self.key is not None
        engine_share = memory_model(*self.key).bytes_per_voxel * math.prod(roi) / 1e6
        self.pool_limit_mb = max(left - engine_share, 64.0)
        cap_memory_pool(self.pool_limit_mb)
        return self.design

    def rois(self, shape: Sequence[int], max_roi: Sequence[int] | None = None, overlap: float = 0.0,
             channels: int | None = None, divisor: int = 16) -> list[Roi]:
        """Tiles to try for a crop of ``shape`` (best first; smaller ones for out-of-memory retries; sides multiples
        of the model's ``divisor``). Before
        :meth:`measure_sessions` (or without NVML) from the modelled peak; after it from what is left."""
        assert self.key is not None, "rois() needs a plan that applies"
        budget = self.budget_mb
        fixed = memory_model(*self.key).fixed_mb
        if self.after_sessions_mb is not None:  # measured: context + weights + state replace the model's fixed part
            budget = self.budget_mb - self.after_sessions_mb + fixed
        elif self.design.sessions_mb is not None:  # estimated: the design's sessions replace it
            budget = self.budget_mb - self.design.sessions_mb + fixed
        kwargs: dict[str, Any] = {"channels": channels or self.channels, "overlap": overlap, "divisor": divisor}
        if max_roi is not None:
            kwargs["max_roi"] = tuple(max_roi)
        return candidate_rois(max(budget, 1.0), shape, *self.key, arena_mb=self.arena_mb, **kwargs)

    def report(self) -> dict[str, Any]:
        return {"budget_mb": self.budget_mb, "model_applies": self.applies,
                "arena_limit_mb": None if self.arena_mb is None else round(self.arena_mb, 1),
                "after_sessions_mb": None if self.after_sessions_mb is None else round(self.after_sessions_mb, 1),
                "cupy_pool_limit_mb": None if self.pool_limit_mb is None else round(self.pool_limit_mb, 1),
                "before_sessions_mb": None if self.before_sessions_mb is None else round(self.before_sessions_mb, 1),
                "design": self.design.report()}
