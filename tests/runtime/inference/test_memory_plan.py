"""The memory plan: one object owns the budget, the arena cap and the tile choice (GPU figures unmeasured here)."""

from __future__ import annotations

import math

import pytest
from flare.runtime.inference.engines import backend_for
from flare.runtime.inference.memory_plan import DEFAULT_BUDGET_MB, MemoryPlan


def test_no_plan_on_the_cpu() -> None:
    plan = MemoryPlan.build(None, None, "fp32", 13)
    assert plan.budget_mb == DEFAULT_BUDGET_MB and not plan.applies and plan.arena_mb is None
    plan.measure_sessions()  # nothing to measure
    assert plan.report()["after_sessions_mb"] is None


def test_cuda_plan_caps_the_arena_and_chooses_tiles_from_what_is_left() -> None:
    plan = MemoryPlan.build(4000, backend_for("cuda"), "fp16", 13)
    assert plan.applies and plan.arena_mb is not None and 0 < plan.arena_mb < 4000
    modelled = plan.rois((288, 240, 400))
    assert modelled and all(r % 16 == 0 for roi in modelled for r in roi)
    plan.after_sessions_mb = 3000.0  # measured: the sessions already hold 3 GB of the 4 GB
    tight = plan.rois((288, 240, 400))
    assert math.prod(tight[0]) < math.prod(modelled[0])
    plan.after_sessions_mb = 1000.0
    assert math.prod(plan.rois((288, 240, 400))[0]) >= math.prod(tight[0])
    with pytest.raises(ValueError, match="positive"):
        MemoryPlan.build(0, backend_for("cuda"), "fp16", 13)


def test_budget_is_defined_once() -> None:
    """The default budget lives in memory_plan; the CLI reads it from there."""
    import subprocess

    from conftest import REPO

    hits = subprocess.run(["grep", "-rn", "--include=*.py", "4000", str(REPO / "runtime")], check=False, capture_output=True,
                          text=True).stdout.splitlines()
    assert [h for h in hits if "= 4000" in h] == [h for h in hits if "memory_plan.py" in h and "= 4000" in h]
