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


def test_design_estimated_from_file_sizes_then_measured() -> None:
    """Five 176 MB fp16 folds + a 2 MB locator: resident at the default budget, one fold session at a time at
    2000 MB (estimate); NVML figures after the sessions exist replace the estimate."""
    from flare.runtime.inference.memory_plan import MIN_WORKING_ROI

    folds, cuda = [176.0] * 5, backend_for("cuda")
    default = MemoryPlan.build(None, cuda, "fp16", 13, model_mb=folds, locator_mb=2.0)
    assert default.design.name == "resident" and default.design.group == 5 and default.design.source == "estimate"
    tight = MemoryPlan.build(2000, cuda, "fp16", 13, model_mb=folds, locator_mb=2.0)
    assert tight.design.name == "grouped" and tight.design.group == 1
    assert tight.design.sessions_mb + tight.working_mb() <= 2000 < tight._estimated_sessions_mb(2) + tight.working_mb()
    assert "x".join(map(str, MIN_WORKING_ROI)) in tight.design.why and tight.report()["design"]["group"] == 1
    # the tiles leave room for the design's sessions: fewer sessions, larger tiles
    assert math.prod(tight.rois((288, 240, 400))[0]) <= math.prod(
        MemoryPlan.build(2000, cuda, "fp16", 13, model_mb=folds[:1]).rois((288, 240, 400))[0])
    # measured: 1 locator + 5 folds took 3400 MB over a 500 MB context (567 MB a session): four fit 4000 MB
    plan = MemoryPlan.build(4000, cuda, "fp16", 13, model_mb=folds, locator_mb=2.0)
    plan.before_sessions_mb, plan.after_sessions_mb = 500.0, 3900.0
    measured = plan.measured_design(sessions=6, folds_alive=5)
    assert measured.source == "measured" and measured.name == "grouped" and measured.group == 4
    assert measured.sessions_mb + plan.working_mb() <= 4000
    plan.after_sessions_mb = 1700.0  # 200 MB a session: all five fit
    assert plan.measured_design(sessions=6, folds_alive=5).name == "resident"
    # on the CPU no model applies: every fold resident, said so
    cpu = MemoryPlan.build(2000, None, "fp32", 13, model_mb=folds)
    assert cpu.design.name == "resident" and cpu.design.group == 5 and "CPU" in cpu.design.why
