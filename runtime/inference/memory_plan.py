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
  the CPU), each fallback recorded in the report (``gpu.fallback``).

Five resident fp16 fold sessions + the locator at a 2000 MB budget (estimate from BENCHMARKS-ANCHORS.md, not
measured): CUDA context ≈ 480 MB + fp16 weights ≈ 5 × 174 MB + locator ≈ 880 MB + per-session cuDNN/cuBLAS
state outside the arena ≈ 0.1–0.3 GB each → 1.9–2.7 GB before the first activation. So the 2000 MB budget most
likely does **not** fit five resident sessions; the alternative (sessions per pass, or fold-major with bounded
host accumulation) is not implemented yet — the plan reports ``after_sessions_mb`` so the GPU check shows it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flare.runtime.inference.budget import (
    MEMORY_MODELS,
    WORST_CROP,
    arena_limit_mb,
    candidate_rois,
    memory_model,
)
from flare.runtime.inference.device import cap_memory_pool, device_memory_used_mb

log = logging.getLogger("flare.runtime")

__all__ = ["DEFAULT_BUDGET_MB", "MemoryPlan"]

#: the default device memory budget, MB (the FLARE limit: 4 GB); the one definition
DEFAULT_BUDGET_MB = 4000.0

Roi = tuple[int, int, int]


@dataclass
class MemoryPlan:
    budget_mb: float
    key: tuple[str, str] | None  # (backend, precision) of the fold engines; None: no device engine
    channels: int = 13
    arena_mb: float | None = None
    after_sessions_mb: float | None = None
    pool_limit_mb: float | None = None

    @classmethod
    def build(cls, budget_mb: float | None, backend: str | None, precision: str, channels: int) -> MemoryPlan:
        """The plan for fold engines of ``backend`` (None on the CPU) at ``precision`` under ``budget_mb``."""
        budget = DEFAULT_BUDGET_MB if budget_mb is None else float(budget_mb)
        if budget <= 0:
            raise ValueError(f"memory budget must be positive, got {budget} MB")
        plan = cls(budget, None if backend is None else (backend, precision), channels)
        if plan.applies:
            assert plan.key is not None
            plan.arena_mb = arena_limit_mb(budget, *plan.key, channels=channels)
        return plan

    @property
    def applies(self) -> bool:
        """Whether a memory model applies: the one place this is decided."""
        return self.key is not None and self.key in MEMORY_MODELS

    def measure_sessions(self) -> None:
        """After the sessions exist: the device's used memory (NVML), and CuPy's pool capped at what is left of
        the budget minus the engine's share of the tile the worst-case crop would get."""
        if not self.applies:
            return
        self.after_sessions_mb = device_memory_used_mb()
        if self.after_sessions_mb is None:
            return
        left = self.budget_mb - self.after_sessions_mb
        if left <= 0:
            log.warning("the sessions alone use %.0f MB of the %.0f MB budget: tiles will be the smallest, and "
                        "out-of-memory fallbacks likely", self.after_sessions_mb, self.budget_mb)
        roi = self.rois(WORST_CROP)[0]
        assert self.key is not None
        engine_share = memory_model(*self.key).bytes_per_voxel * math.prod(roi) / 1e6
        self.pool_limit_mb = max(left - engine_share, 64.0)
        cap_memory_pool(self.pool_limit_mb)

    def rois(self, shape: Sequence[int], max_roi: Sequence[int] | None = None, overlap: float = 0.0,
             channels: int | None = None) -> list[Roi]:
        """Tiles to try for a crop of ``shape`` (best first; smaller ones for out-of-memory retries). Before
        :meth:`measure_sessions` (or without NVML) from the modelled peak; after it from what is left."""
        assert self.key is not None, "rois() needs a plan that applies"
        budget = self.budget_mb
        if self.after_sessions_mb is not None:  # measured: context + weights + state replace the model's fixed part
            budget = self.budget_mb - self.after_sessions_mb + memory_model(*self.key).fixed_mb
        kwargs: dict[str, Any] = {"channels": channels or self.channels, "overlap": overlap}
        if max_roi is not None:
            kwargs["max_roi"] = tuple(max_roi)
        return candidate_rois(max(budget, 1.0), shape, *self.key, arena_mb=self.arena_mb, **kwargs)

    def report(self) -> dict[str, Any]:
        return {"budget_mb": self.budget_mb, "model_applies": self.applies,
                "arena_limit_mb": None if self.arena_mb is None else round(self.arena_mb, 1),
                "after_sessions_mb": None if self.after_sessions_mb is None else round(self.after_sessions_mb, 1),
                "cupy_pool_limit_mb": None if self.pool_limit_mb is None else round(self.pool_limit_mb, 1)}
